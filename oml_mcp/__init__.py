"""`oml_mcp`: the OML engine as MCP tools for assistants (Claude Code, Claude Desktop, Cursor, ...).

Thin wiring only: tools validate arguments against the engine's stage configs, confine every
path to the workspace, call `oml_core`, and return small structured summaries without
fingerprint secrets. Fine-tuning runs in detached worker processes whose state lives on disk
under `$OML_HOME/jobs`, so a job outlives the server and a restarted server finds it again.

Run it with `python -m oml_mcp` (stdio) or `python -m oml_mcp --transport streamable-http`.
"""
