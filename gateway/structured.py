"""Structured outputs: a request's response_format (or forced tool call) as the grammar its answer must follow.

The grammar is compiled against the model's vocabulary off the event loop, once per grammar (engine's
GrammarCompiler caches it); one the library cannot enforce is the client's mistake, a 400 that says why.
"""
from __future__ import annotations

from engine import GrammarError, json_schema_grammar
from gateway.errors import bad_request
from gateway.offload import off_loop
from gateway.protocol import JSONObjectFormat, JSONSchemaResponseFormat, TextFormat

# OpenAI's json_object: any JSON object.
_ANY_OBJECT = {"type": "object"}


def format_schema(fmt: TextFormat | JSONObjectFormat | JSONSchemaResponseFormat | None, param: str) -> dict | None:
    """The JSON schema an answer in this format validates against; None for free text."""
    if fmt is None or isinstance(fmt, TextFormat):
        return None
    schema = _ANY_OBJECT if isinstance(fmt, JSONObjectFormat) else fmt.json_schema.schema_
    if schema is None:
        raise bad_request("json_schema needs a schema", f"{param}.json_schema.schema")
    return schema


def format_grammar(fmt: TextFormat | JSONObjectFormat | JSONSchemaResponseFormat | None, param: str) -> str | None:
    """The grammar of an answer in this format; None for free text."""
    schema = format_schema(fmt, param)
    if schema is None:
        return None
    try:
        return json_schema_grammar(schema)
    except (GrammarError, ValueError) as e:
        raise bad_request(f"invalid JSON schema: {e}", param, "invalid_json_schema") from None


async def compiled(state, grammar: str | None, param: str) -> str | None:
    """The grammar once the engine's compiler has taken it (off the loop), or a 400 naming `param`."""
    if grammar is None:
        return None
    try:
        return await off_loop(state.engine.grammars.check, grammar)
    except GrammarError as e:
        raise bad_request(f"this output format cannot be enforced: {e}", param, "invalid_grammar") from None
