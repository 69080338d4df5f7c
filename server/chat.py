"""Chat messages -> the instruction template: the last user message is the instruction; system text and
earlier turns (`User: ...` / `Assistant: ...`) fill the Input block, the oldest turns dropped first."""

from engine.detokenizer import encode_prompt
from prompt import format_prompt
from server.config import invalid
from server.schema import short


def message_text(message, index):
    """A chat message's content as text (a string, or a list of {"type": "text", "text": ...} parts)."""
    param = f"messages[{index}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    if content is None and message.get("role") == "assistant":
        return ""
    raise invalid(param, f'{param} must be a string or a list of text parts ({{"type": "text", "text": ...}})')

def split_chat(messages):
    """messages -> (system text, earlier turns [(role, text)], last user text); validates roles and order."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"messages[{i}].role", f"messages[{i}].role must be one of system, developer, user, "
                                                 f"assistant, got {short(role)}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}]", f"messages[{i}] has unsupported fields: {', '.join(sorted(extra))}")
        text = message_text(m, i)
        (system if role in ("system", "developer") else turns).append(text if role in ("system", "developer")
                                                                       else (role, text))
    if not turns or turns[-1][0] != "user":
        raise invalid("messages", "messages: the last message must have role 'user'")
    if not turns[-1][1].strip():
        last = f"messages[{len(messages) - 1}].content"
        raise invalid(last, f"{last}: the last user message must not be empty")
    return "\n\n".join(s for s in system if s), turns[:-1], turns[-1][1]

def chat_context(system_text, history):
    """The ### Input: text: system text, blank line, then the transcript `User: ...` / `Assistant: ...`."""
    transcript = "\n".join(f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in history)
    return "\n\n".join(part for part in (system_text, transcript) if part)

def fold_chat(messages, fits):
    """The templated prompt ids for a chat, keeping the most recent earlier turns for which
    fits(n_tokens) holds. Binary search on how many of the oldest turns to drop (a few encodings)."""
    system, history, instruction = split_chat(messages)

    def build(drop):
        return encode_prompt(format_prompt(instruction, chat_context(system, history[drop:])), raw=True)

    best = build(0)
    if fits(len(best)) or not history:
        return best
    lo, hi = 0, len(history)  # dropping lo turns does not fit; dropping hi is the last resort
    best = build(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = build(mid)
        if fits(len(ids)):
            hi, best = mid, ids
        else:
            lo = mid
    return best
