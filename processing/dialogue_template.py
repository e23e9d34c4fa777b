"""DiaNA's dialogue template: any accepted dialogue form -> (question, answer) pairs -> training text.

The dialogue text must match what DiaNA was trained on (the official code's template):

    {system prompt}\\n\\nASSISTANT: {q1}\\nUSER: {a1}\\nASSISTANT: {q2}\\nUSER: {a2}...

`normalize_dialogue` accepts the ChatPedes message and round forms, chat-template messages,
(question, answer) pairs, {"question", "answer"} dicts and free text, and refuses anything else
naming the dialogue and round. `round_segments` cuts the rendered text at round boundaries (the
processor tokenises segment by segment, see `round_tokenization`), and `DIALOGUE_CHAT_TEMPLATE`
renders the same text through `apply_chat_template`.

Ships next to the weights as remote code with `processing_diana`: imports only numpy and the
standard library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SYSTEM_PROMPT = (
    "You are an intelligent system designed to retrieve pedestrian images from dialogues. Extract key "
    "attributes such as clothing, accessories, gender, and distinctive features from the conversation. "
    "Use the aggregated information from all dialogue turns to perform accurate person image retrieval."
)
DEFAULT_FIRST_QUESTION = "Please describe the person you saw."
QUESTION_PREFIX = "ASSISTANT: "
ANSWER_PREFIX = "USER: "

# Message roles. ChatPedes stores the questioner as "gpt" and the witness as "user"; chat-template
# users write "assistant" for the questioner.
QUESTION_ROLES = frozenset({"gpt", "assistant"})
ANSWER_ROLES = frozenset({"user"})
SYSTEM_ROLE = "system"

# The same rendering as `render_dialogue`, for `apply_chat_template(messages, tokenize=False)`.
# Jinja's `trim` is Python's `str.strip`, matching `normalize_dialogue`. A system message is
# optional; without one DiaNA's fixed system prompt is inserted.
DIALOGUE_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_prompt = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_prompt = '" + SYSTEM_PROMPT.replace("'", "\\'") + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content | trim -}}"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- text(system_prompt) -}}"
    "{%- for message in turns -%}"
    "{%- set expect_question = loop.index0 % 2 == 0 -%}"
    "{%- if message['role'] in ['assistant', 'gpt'] and expect_question -%}"
    "{{- ('\\n\\n' if loop.first else '\\n') + 'ASSISTANT: ' + text(message['content']) -}}"
    "{%- elif message['role'] == 'user' and not expect_question -%}"
    "{{- '\\nUSER: ' + text(message['content']) -}}"
    "{%- else -%}"
    "{{- raise_exception('DiaNA dialogues alternate assistant (question) and user (answer) messages, "
    "starting with a question; message ' ~ loop.index0 ~ ' has role ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class DialogueError(ValueError):
    """A dialogue that cannot be rendered; the message names the dialogue index and round."""


def _where(index: int | None, round_index: int | None = None) -> str:
    parts = []
    if index is not None:
        parts.append(f"dialogue {index}")
    if round_index is not None:
        parts.append(f"round {round_index + 1}")
    return (", ".join(parts) + ": ") if parts else ""


def _text(value: Any, index: int | None, round_index: int, field: str) -> str:
    if not isinstance(value, str):
        raise DialogueError(
            f"{_where(index, round_index)}{field} must be a string, got {type(value).__name__}: {value!r:.80}"
        )
    # Each question/answer is stripped so that a round's text never ends in whitespace: the
    # template strips trailing whitespace, and a k-round prefix must render as a prefix.
    value = value.strip()
    if not value:
        raise DialogueError(f"{_where(index, round_index)}empty {field}")
    return value


def _message_role_and_value(message: Mapping, index: int | None, position: int) -> tuple[str, Any]:
    if "from" in message:
        return message["from"], message.get("value")
    if "role" in message:
        content = message.get("content")
        if isinstance(content, list):  # chat-template content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        return message["role"], content
    raise DialogueError(
        f"{_where(index)}message {position} has neither 'from'/'value' (ChatPedes) nor 'role'/'content' keys: "
        f"{sorted(message)}"
    )


def _pairs_from_messages(messages: Sequence[Mapping], index: int | None) -> list[tuple[str, str]]:
    """Flat message list ([{"from": "gpt", ...}, {"from": "user", ...}, ...]) to (q, a) pairs."""
    pairs: list[tuple[str, str]] = []
    question: Any = None
    has_question = False
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DialogueError(
                f"{_where(index, len(pairs))}message {position} must be a dict, got {type(message).__name__}"
            )
        role, value = _message_role_and_value(message, index, position)
        round_index = len(pairs)
        if role == SYSTEM_ROLE:
            if position != 0:
                raise DialogueError(f"{_where(index, round_index)}a system message is only allowed first")
            if not isinstance(value, str) or value.strip() != SYSTEM_PROMPT:
                raise DialogueError(
                    f"{_where(index)}DiaNA was trained with one fixed system prompt; drop the system message or "
                    "pass exactly processing_diana.SYSTEM_PROMPT"
                )
            continue
        if role in QUESTION_ROLES:
            if has_question:
                raise DialogueError(
                    f"{_where(index, round_index)}two questions in a row (message {position}, role {role!r})"
                )
            question, has_question = value, True
        elif role in ANSWER_ROLES:
            if not has_question:
                raise DialogueError(f"{_where(index, round_index)}answer without a question (message {position})")
            pairs.append((_text(question, index, round_index, "question"), _text(value, index, round_index, "answer")))
            has_question = False
        else:
            raise DialogueError(
                f"{_where(index, round_index)}unknown role {role!r} in message {position} "
                f"(questions: {sorted(QUESTION_ROLES)}, answers: {sorted(ANSWER_ROLES)})"
            )
    if has_question:
        raise DialogueError(f"{_where(index, len(pairs))}question without an answer")
    return pairs


def normalize_dialogue(dialogue: Any, index: int | None = None) -> list[tuple[str, str]]:
    """Bring a dialogue in any accepted form to a list of stripped (question, answer) pairs.

    Accepted forms:
        - ChatPedes messages, flat: `[{"from": "gpt", "value": q}, {"from": "user", "value": a}, ...]`
          (chat-style `{"role": "assistant"|"user", "content": ...}` works the same);
        - ChatPedes rounds: `[[{"from": "gpt", ...}, {"from": "user", ...}], ...]`;
        - `(question, answer)` pairs: `[(q1, a1), (q2, a2), ...]`;
        - `{"question", "answer"}` dicts (the dataset column format);
        - a string: one round answering "Please describe the person you saw.".

    Args:
        dialogue: The dialogue.
        index: Its index in the batch, used in error messages.

    Raises:
        DialogueError: Unknown role, two questions in a row, empty dialogue / question / answer, a
            non-string value; the message names the dialogue index and the (1-based) round.
    """
    if isinstance(dialogue, str):
        return [(DEFAULT_FIRST_QUESTION, _text(dialogue, index, 0, "answer"))]
    if isinstance(dialogue, Mapping) or not isinstance(dialogue, Sequence) or isinstance(dialogue, bytes):
        raise DialogueError(
            f"{_where(index)}a dialogue must be a list of rounds or a string, got {type(dialogue).__name__}"
        )
    if len(dialogue) == 0:
        raise DialogueError(f"{_where(index)}empty dialogue")

    first = dialogue[0]
    if isinstance(first, Mapping) and ("question" in first or "answer" in first):
        pairs = []
        for round_index, item in enumerate(dialogue):
            if not isinstance(item, Mapping) or "question" not in item or "answer" not in item:
                raise DialogueError(
                    f"{_where(index, round_index)}expected a {{'question', 'answer'}} dict, got {item!r:.80}"
                )
            pairs.append((_text(item["question"], index, round_index, "question"),
                          _text(item["answer"], index, round_index, "answer")))
        return pairs
    if isinstance(first, Mapping):
        pairs = _pairs_from_messages(dialogue, index)
    else:
        pairs = []
        messages: list[Mapping] = []
        for round_index, item in enumerate(dialogue):
            if isinstance(item, (str, bytes, Mapping)) or not isinstance(item, Sequence) or len(item) != 2:
                raise DialogueError(
                    f"{_where(index, round_index)}expected a (question, answer) pair or a 2-message round, "
                    f"got {item!r:.80}"
                )
            if isinstance(item[0], Mapping):  # ChatPedes round: [{"from": "gpt"}, {"from": "user"}]
                messages.extend(item)
            else:
                if messages:
                    raise DialogueError(
                        f"{_where(index, round_index)}mixes message rounds and (question, answer) pairs"
                    )
                pairs.append((_text(item[0], index, round_index, "question"),
                              _text(item[1], index, round_index, "answer")))
        if messages:
            if pairs:
                raise DialogueError(f"{_where(index)}mixes message rounds and (question, answer) pairs")
            pairs = _pairs_from_messages(messages, index)
    if not pairs:
        raise DialogueError(f"{_where(index)}empty dialogue (no question/answer round)")
    return pairs


def round_segments(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The template text of each round; their concatenation is the rendered dialogue.

    Segment 1 carries the system prompt; every later segment starts with its newline, so the first
    k segments render exactly the first k rounds.
    """
    segments = []
    for k, (question, answer) in enumerate(pairs):
        head = SYSTEM_PROMPT + "\n\n" if k == 0 else "\n"
        segments.append(f"{head}{QUESTION_PREFIX}{question}\n{ANSWER_PREFIX}{answer}")
    return segments


def render_dialogue(dialogue: Any, max_rounds: int | None = None, index: int | None = None) -> str:
    """The exact training text of a dialogue (without BOS), optionally only its first `max_rounds` rounds."""
    pairs = normalize_dialogue(dialogue, index)
    if max_rounds is not None:
        pairs = pairs[: checked_max_rounds(max_rounds)]
    return "".join(round_segments(pairs)).rstrip()


def checked_max_rounds(max_rounds: Any) -> int:
    """`max_rounds` as an int; a ValueError unless it is a positive integer."""
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    return int(max_rounds)


def as_dialogue_batch(dialogues: Any) -> list[Any]:
    """A batch of dialogues from one dialogue or a list of them.

    A single dialogue is recognised when unambiguous: a string, a flat list of dicts, or a list of
    (question, answer) string pairs. Anything else that is a list is a batch; a single dialogue in
    the nested ChatPedes round form must be passed in a list.
    """
    if isinstance(dialogues, str):
        return [dialogues]
    if isinstance(dialogues, Sequence) and len(dialogues) > 0:
        first = dialogues[0]
        if isinstance(first, Mapping):
            return [dialogues]
        if (isinstance(first, (tuple, list)) and len(first) == 2
                and all(isinstance(x, str) for x in first)):
            return [dialogues]
        return list(dialogues)
    if isinstance(dialogues, Sequence):
        raise DialogueError("dialogues is an empty list")
    raise DialogueError(f"dialogues must be a dialogue or a list of dialogues, got {type(dialogues).__name__}")


__all__ = [
    "ANSWER_PREFIX", "DEFAULT_FIRST_QUESTION", "DIALOGUE_CHAT_TEMPLATE", "DialogueError", "QUESTION_PREFIX",
    "SYSTEM_PROMPT", "as_dialogue_batch", "checked_max_rounds", "normalize_dialogue", "render_dialogue",
    "round_segments",
]
