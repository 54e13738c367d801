"""Chat templates (``render_chat``) and output parsing (``parse_output``, ``StreamParser``)."""

from hunyuan_jax.chat.parsing import ParsedOutput, StreamParser, opens_reasoning, parse_output
from hunyuan_jax.chat.templates import (FAMILIES, HY3_EFFORTS, HY3_OPENSOURCE, HY3_PREVIEW, Hy3Markup,
                                        hy3_family_for, render_chat)

__all__ = ["FAMILIES", "HY3_EFFORTS", "HY3_OPENSOURCE", "HY3_PREVIEW", "Hy3Markup", "ParsedOutput",
           "StreamParser", "hy3_family_for", "opens_reasoning", "parse_output", "render_chat"]
