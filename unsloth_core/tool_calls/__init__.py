"""Tool calls through a model's own chat template: the convention its family follows (conventions.py), what the
template is given (prompt.py), the reply read back into text and calls, whole or streamed (parser.py), and the
grammar that makes a reply a valid call (grammar.py). Imports no torch."""

from unsloth_core.tool_calls.conventions import (
    CONVENTIONS,
    HERMES,
    LLAMA3,
    Convention,
    Tool,
    ToolCall,
    detect_convention,
)
from unsloth_core.tool_calls.grammar import call_schema, tool_call_constraint
from unsloth_core.tool_calls.parser import (
    Call,
    Content,
    Event,
    ToolCallParser,
    parse_tool_calls,
    tool_call_parser,
)
from unsloth_core.tool_calls.prompt import (
    ToolCallError,
    calls_of,
    conversation_inputs,
    prompt_messages,
    renders_tools,
    tool_support,
    uses_tools,
)

__all__ = ["CONVENTIONS", "HERMES", "LLAMA3", "Call", "Content", "Convention", "Event", "Tool", "ToolCall",
           "ToolCallError", "ToolCallParser", "call_schema", "calls_of", "conversation_inputs", "detect_convention",
           "parse_tool_calls", "prompt_messages", "renders_tools", "tool_call_constraint", "tool_call_parser",
           "tool_support", "uses_tools"]
