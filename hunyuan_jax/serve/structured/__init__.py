"""Structured outputs: a grammar matched byte by byte, and the tokens each of its states allows.

`tool_choice` "required", {"function": {"name": ...}} or "auto" with `strict` tools, and
`response_format` json_object / json_schema or vLLM's `structured_outputs` / `guided_json` /
`guided_choice` / `guided_regex` / `guided_grammar` (GBNF) constrain a reply to a grammar: the engine samples every token of such a request
from `Guide.allowed_bits()`, the tokens whose bytes keep the text a prefix of the grammar's
language (stop tokens once it is complete), so tool calls and JSON replies parse and follow their
schema. Tool calls are forced in the model's own format (A13B's JSON array, Hy3's XML-like tags),
which the reply parser already reads; reasoning stays free.

    grammar.py   nodes, the byte-level NFA over them and its token masks
    schema.py    JSON schemas as nodes
    regex.py     regular expressions as nodes (also JSON-schema patterns, formats, integer ranges)
    vocab.py     the vocabulary's bytes (TokenTable) and Guide (a request's position, thinking budget)
    ebnf.py      EBNF (GBNF) grammars as nodes
    chat.py      the grammars of chat and completion requests
"""
from hunyuan_jax.serve.structured.chat import (answer_constraint, chat_grammar, completion_grammar,
                                               free_reply_grammar)
from hunyuan_jax.serve.structured.grammar import Builder, Grammar, Node, SchemaError
from hunyuan_jax.serve.structured.regex import regex_node
from hunyuan_jax.serve.structured.schema import schema_node
from hunyuan_jax.serve.structured.vocab import Guide, TokenTable, token_table

__all__ = ["Builder", "Grammar", "Guide", "Node", "SchemaError", "TokenTable", "answer_constraint", "chat_grammar",
           "completion_grammar", "free_reply_grammar", "regex_node", "schema_node", "token_table"]
