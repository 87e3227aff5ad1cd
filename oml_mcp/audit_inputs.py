"""What `start_audit` accepts besides the config's own ranges: where the API key comes from,
which headers and base URLs may be given, and where a request template may be read.

Tool arguments pass through the assistant's context and transcript, and a prompt-injected
assistant may choose them, so:

- The API key is never an argument. `api_key_env` names a variable of the SERVER's
  environment whose value the audit sends to the endpoint, and only names on an allow-list
  are taken: `OPENAI_API_KEY` (AuditConfig's default) and `OML_AUDIT_<NAME>`. Any other name
  is refused, so a call cannot make the server send, say, HF_TOKEN, OML_MCP_TOKEN or a cloud
  credential to an endpoint of its choosing. Errors never quote the value given (it may be
  the key itself, pasted by mistake).
- A header value may be `$API_KEY` (optionally after one scheme word: `Bearer $API_KEY`),
  filled in from that variable at send time; a literal value only for Content-Type, Accept
  and User-Agent. Any other literal may be a secret and is refused.
- A base URL is any http(s) URL (the auditor is for remote endpoints), without user:password
  and without query parameters that look like credentials (key, token, secret, ...).
- A request template is inline JSON, or a file inside the workspace.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import parse_qsl, urlsplit

from oml_core.errors import OMLInputError
from oml_mcp.paths import Workspace, name_problem, shown

API_KEY_ENV_PATTERN = re.compile(r"OPENAI_API_KEY|OML_AUDIT_[A-Z0-9_]{1,64}")
API_KEY_ENV_RULE = ("OPENAI_API_KEY or a name starting with OML_AUDIT_ (capitals, digits, '_'), "
                    "set in the server's environment, e.g. `claude mcp add oml -e "
                    "OML_AUDIT_SUSPECT_KEY=... -- ...`")
# header values that are never credentials (as clients/audit.py treats them)
PLAIN_HEADERS = ("content-type", "accept", "user-agent")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")
_KEY_ONLY = re.compile(r"(?:[A-Za-z][A-Za-z0-9_-]{0,31} )?\$API_KEY")
_CREDENTIAL_PARAM = re.compile(r"key|token|secret|pass|auth|sig|credential|session",
                               re.IGNORECASE)
MAX_URL_CHARS = 2048
MAX_MODEL_CHARS = 512


def check_api_key_env(name: object) -> str:
    if not isinstance(name, str) or not API_KEY_ENV_PATTERN.fullmatch(name):
        raise OMLInputError("api_key_env must name the server's environment variable holding "
                            f"the endpoint's API key: {API_KEY_ENV_RULE} (the key itself is "
                            "never a tool argument)")
    return name


def check_headers(lines: list[str]) -> list[str]:
    for line in lines:
        if not isinstance(line, str):
            raise OMLInputError("header: each must be a string 'Name: value'")
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _HEADER_NAME.fullmatch(name):
            raise OMLInputError("header: use the form 'Name: value' with a plain header name, "
                                "e.g. 'Authorization: Bearer $API_KEY'")
        if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
            raise OMLInputError(f"header {shown(name)}: its value contains a control character; "
                                "use a plain value")
        if name.lower() not in PLAIN_HEADERS and not _KEY_ONLY.fullmatch(value):
            raise OMLInputError(
                f"header {shown(name)}: over MCP a header value may only be $API_KEY, optionally "
                "after one scheme word ('Bearer $API_KEY'), filled in from the variable named "
                "by api_key_env; literal values (maybe secrets) are taken only for "
                f"{', '.join(PLAIN_HEADERS)}; for other headers run `oml audit` from a shell")
    return lines


def check_base_url(url: object) -> str:
    """Any http(s) URL with a host; one line naming what is wrong (the URL itself is not
    quoted: it may hold a credential)."""
    example = "e.g. https://api.example.com/v1"
    if not isinstance(url, str) or not url.strip():
        raise OMLInputError(f"base_url is required: the endpoint's base URL, {example}")
    if len(url) > MAX_URL_CHARS:
        raise OMLInputError(f"base_url is too long ({len(url)} characters, at most "
                            f"{MAX_URL_CHARS})")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in url):
        raise OMLInputError("base_url contains a space or control character; pass the URL alone")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is no number or out of range
    except ValueError:
        raise OMLInputError(f"base_url is not a valid URL (a bad host or port?); "
                            f"{example}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise OMLInputError(f"base_url must start with http:// or https://, {example}")
    if not parts.hostname:
        raise OMLInputError(f"base_url has no host; {example}")
    if parts.username is not None or parts.password is not None:
        raise OMLInputError("base_url must not carry user:password@; put the API key in the "
                            "server's variable named by api_key_env")
    if parts.fragment:
        raise OMLInputError("base_url must not have a #fragment; pass the endpoint's URL alone")
    secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)
              if _CREDENTIAL_PARAM.search(k)]
    if secret:
        raise OMLInputError(f"base_url has a query parameter that looks like a credential "
                            f"({shown(secret[0])}); over MCP the key goes in the server's "
                            "variable named by api_key_env (a header with $API_KEY)")
    return url


def check_model_name(model: object) -> str:
    if not isinstance(model, str) or not model.strip():
        raise OMLInputError("model is required: the model name the endpoint expects")
    problem = name_problem(model) if len(model) <= MAX_MODEL_CHARS else (
        f"is too long ({len(model)} characters, at most {MAX_MODEL_CHARS})")
    if problem:
        raise OMLInputError(f"model {shown(model)} {problem}")
    if model.startswith("-"):
        raise OMLInputError(f"model {shown(model)} starts with '-'; pass the endpoint's model name")
    return model


def request_template(ws: Workspace, spec: str | None) -> str | None:
    """Inline JSON as given; anything else is a file path, confined to the workspace."""
    if spec is None or spec.lstrip().startswith(("{", "[")):
        return spec
    path = ws.path(spec, "request_template")
    if not path.is_file():
        raise OMLInputError(f"request_template {shown(spec)} is neither inline JSON nor a file; "
                            "pass a JSON body with $KEY or the path of one in the workspace")
    return str(path)
