"""OML engine: generate fingerprints, fine-tune them into a model, verify, produce evidence.

The engine knows nothing of the CLI or MCP; those are thin layers over these modules.
"""

__version__ = "0.1.0"
