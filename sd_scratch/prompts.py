"""AUTOMATIC1111's prompt syntax: emphasis weights and prompt editing, in plain Python.

AUTOMATIC1111's web UI (A1111, `modules/prompt_parser.py`) reads two kinds of markup in a prompt, and most
prompts shared online use both:

Emphasis, `parse_emphasis`, says how strongly each piece of text counts:

    (word)        weight x 1.1          [word]       weight / 1.1
    (word:1.3)    weight x 1.3          ((word))     nesting multiplies: x 1.21
    \\( \\) \\[ \\] \\\\    the bracket or backslash itself, as text
    BREAK         ends the 75-token chunk here (the piece ("BREAK", -1.0))

It returns the prompt as (text, weight) pieces. The tokenizer (`Tokenizer.chunks`) gives each token the
weight of the piece it came from, and the text encoder's output for that token is scaled by it.

Prompt editing, `prompt_schedule`, makes the prompt change while the image is denoised:

    [from:to:when]   `from` up to step `when`, `to` after it      [to:when]    nothing, then `to`
    [from::when]     `from`, then nothing                         [a|b|c]      a, b, c, a, b, ... step by step

It returns the texts to use and the last step of each, [(end_step, text), ...]. Each text is encoded once
(its emphasis read by `parse_emphasis`), and the sampling loop switches conditioning at the end steps
(`text_at_step` picks the text of one step of the loop). Emphasis brackets pass through prompt editing
untouched: `[(red:1.2):blue:5]` is `(red:1.2)` for five steps, then `blue`.

The two readers are separate, as in A1111: `prompt_schedule` first, then `parse_emphasis` on each text.
Both accept any string. Stray brackets are text or are closed at the end; prompt editing returns a prompt
it cannot read unchanged, as a single text for all steps. Only a weight that looks like a number and is not
one, `(word:1.2.3)`, is an error (A1111 fails on it too); `(word:abc)` is text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------
# 1. Emphasis
# ---------------------------------------------------------------------------------------------------------------

ROUND_FACTOR = 1.1  # what (text) multiplies its weight by
# What [text] multiplies its weight by. A1111 multiplies by 1/1.1 rather than dividing by 1.1; the two differ in
# the last bit of some weights, so we do the same to give the same floats.
SQUARE_FACTOR = 1 / 1.1
BREAK_PIECE = ("BREAK", -1.0)  # the piece that tells the tokenizer to end the current chunk

# One token of the emphasis syntax, tried in this order at each position.
_EMPHASIS_TOKEN = re.compile(
    r"""
      \\ (?P<escaped> [()\[\]\\] )?          # \( \) \[ \] \\: that character as text. A backslash before
                                             #   anything else stands alone and is dropped (its next
                                             #   character is read normally)
    | (?P<open_round> \( )
    | (?P<open_square> \[ )
    | : \s* (?P<weight> [+-]? [.\d]+ ) \s* \)  # ":1.3)" closes a round bracket with its own weight
    | (?P<close_round> \) )
    | (?P<close_square> \] )
    | (?P<text> [^\\()\[\]:]+ | : )          # plain text; a ":" that does not start a weight is text too
    """,
    re.VERBOSE,
)
# BREAK as a word of its own, upper case; the spaces around it go with it.
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """A prompt -> its pieces of text and their emphasis weights, as A1111's `parse_prompt_attention`.

    >>> parse_emphasis("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], weights still being multiplied as brackets close
    open_round: list[int] = []  # for each "(" not yet closed: the index of the first piece after it
    open_square: list[int] = []  # the same for "["; the two kinds are counted apart and may cross

    def multiply_from(first: int, factor: float) -> None:  # a bracket closes: all pieces inside it take its factor
        for piece in pieces[first:]:
            piece[1] *= factor

    for token in _EMPHASIS_TOKEN.finditer(text):
        if token.group(0).startswith("\\"):
            # An escaped character is text of weight 1 (brackets closing later multiply it as any text); a lone
            # backslash becomes an empty piece, which normally merges away with its neighbours.
            pieces.append([token["escaped"] or "", 1.0])
        elif token["open_round"]:
            open_round.append(len(pieces))
        elif token["open_square"]:
            open_square.append(len(pieces))
        elif token["weight"] is not None and open_round:
            # (text:w) multiplies by w. It closes the last "(", even when a "[" was opened after it. A1111 reads
            # the number with float(): "1.2.3" or "." match the pattern but are no number, and A1111 fails there.
            try:
                weight = float(token["weight"])
            except ValueError:
                raise ValueError(f"the emphasis weight {token['weight']!r} in {text!r} is not a number") from None
            multiply_from(open_round.pop(), weight)
        elif token["close_round"] and open_round:
            multiply_from(open_round.pop(), ROUND_FACTOR)
        elif token["close_square"] and open_square:
            multiply_from(open_square.pop(), SQUARE_FACTOR)
        else:
            # Plain text, and what has no bracket to close: ")" or "]" alone, ":1.5)" with no "(" open. They are
            # text of weight 1. BREAK inside it becomes a piece of its own; when a bracket around it closes, the
            # BREAK piece is multiplied too (-1.1 in "(a BREAK b)"), and the tokenizer then reads it as the text
            # "BREAK", as A1111's does.
            for index, part in enumerate(_BREAK.split(token.group(0))):
                if index > 0:
                    pieces.append(list(BREAK_PIECE))
                pieces.append([part, 1.0])

    # Brackets still open at the end close there: all remaining "(" first, outermost first, then all "[".
    for first in open_round:
        multiply_from(first, ROUND_FACTOR)
    for first in open_square:
        multiply_from(first, SQUARE_FACTOR)

    if not pieces:
        return [("", 1.0)]

    # Neighbouring pieces of exactly the same weight become one: "(a)(b)" is ("ab", 1.1).
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece_text, weight) for piece_text, weight in merged]


# ---------------------------------------------------------------------------------------------------------------
# 2. Prompt editing
# ---------------------------------------------------------------------------------------------------------------
#
# A1111 parses with this lark grammar (Earley parser) and we parse the same language by hand:
#
#     start:      (prompt | stray)*              stray: any of  [ ] ( ) :   (at the top level only)
#     prompt:     (emphasized | scheduled | alternate | plain | whitespace)*
#     emphasized: "(" prompt ")"  |  "(" prompt ":" prompt ")"  |  "[" prompt "]"
#     scheduled:  "[" [prompt ":"] prompt ":" [whitespace] NUMBER [whitespace] "]"
#     alternate:  "[" prompt ("|" [prompt])+ "]"
#     plain:      characters other than  \ [ ] ( ) : |  , or a backslash and the character after it
#
# So inside any bracket everything must be well formed: brackets pair up, ":" appears only where a rule puts it
# and "|" only between the options of an alternation. At the top level a bracket or ":" that fits no rule is
# plain text, but a "|" outside any [a|b], or a backslash at the very end or before a line break, fits nothing,
# and then the whole prompt fails to parse.
#
# Where the grammar allows more than one reading we decided as follows:
# - At the top level a "[" or "(" that opens a well-formed group is that group, never stray text: "[b:1]]]" is
#   the edit [b:1] followed by "]]". A1111 itself is not consistent here. Both readings fit its grammar, and which
#   one lark's Earley parser returns depends on Python's string-hash seed, so the same prompt can be edited in
#   one run of the web UI and left as text in the next (we saw both for "[b:1]]]"). Only a group with stray
#   brackets or ":" beside it at the top level is affected; we take the reading its author meant.
# - Inside a group the parse is forced: brackets pair up in one way only, and the number of ":" and "|" between
#   a "[" and its "]" says which rule it is (one or two ":" with a number after the last: an edit; "|": an
#   alternation; neither: emphasis). After the first ":" of "[a:b:3]" we read "b" as the `to` text because it
#   is no number; in "[a:3]" the 3 is the number.
# We compared this parser with A1111's (lark 1.1.2, the version it pins) on some 8,000 random prompts, each
# under several hash seeds: where A1111's answer did not change with the seed ours is the same, and where it did
# ours was one of its answers.


@dataclass
class _Edit:
    """[before:after:when]. `before` is None when not written ([after:when]); it shows as nothing."""

    before: list | None
    after: list
    when: float  # the number after the last ":", as written (see _last_step_before)


@dataclass
class _Alternation:
    """[a|b|c]: one text per option, each a list of nodes."""

    options: list[list]


# A parsed prompt is a list of nodes: str (text as written, brackets of emphasis included), _Edit, _Alternation.

_NOT_PLAIN = set("\\[]():|")  # the characters that end a run of plain text
_STRAYS = set("[]():")  # what the top level accepts as text when it fits no rule
# lark's SIGNED_NUMBER (optional sign, digits with an optional point, or a point and digits, optional exponent),
# with the optional whitespace around it and the closing "]" of an edit.
_WHEN_AND_CLOSE = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")


class _NoParse(Exception):
    """This part of the prompt fits no rule of the grammar."""


class _ScheduleParser:
    """Recursive descent over one prompt. Methods take a position and return (nodes, position after them)."""

    def __init__(self, prompt: str):
        self.prompt = prompt

    def top_level(self) -> list:
        """start: well-formed groups and text, with stray brackets and ":" kept as text."""
        nodes, position = [], 0
        while position < len(self.prompt):
            char = self.prompt[position]
            if char in "[(":
                try:
                    group, position = self.group(position)
                    nodes += group
                    continue
                except _NoParse:
                    pass  # not a well-formed group: the bracket is text, and what follows it is read on
            if char in _STRAYS:
                nodes.append(char)
                position += 1
            else:
                text, position = self.plain(position)  # fails on "|", and on a backslash with nothing to escape
                nodes.append(text)
        return nodes

    def prompt_part(self, position: int) -> tuple[list, int]:
        """prompt: groups and plain text, up to the first ] ) : | or the end; it may be empty."""
        nodes = []
        while position < len(self.prompt) and self.prompt[position] not in "]):|":
            if self.prompt[position] in "[(":
                group, position = self.group(position)
                nodes += group
            else:
                text, position = self.plain(position)
                nodes.append(text)
        return nodes, position

    def plain(self, position: int) -> tuple[str, int]:
        """plain: a run of ordinary characters and backslash escapes (kept as written, backslash included)."""
        start = position
        while position < len(self.prompt):
            char = self.prompt[position]
            if char == "\\":
                # A backslash takes the next character along, whatever it is, except a line break (lark's ".").
                if position + 1 == len(self.prompt) or self.prompt[position + 1] == "\n":
                    raise _NoParse
                position += 2
            elif char in _NOT_PLAIN:
                break
            else:
                position += 1
        if position == start:
            raise _NoParse  # a "|" where no alternation can take it
        return self.prompt[start:position], position

    def expect(self, position: int, char: str) -> int:
        if position < len(self.prompt) and self.prompt[position] == char:
            return position + 1
        raise _NoParse

    def group(self, position: int) -> tuple[list, int]:
        """A group starting at `position` ("(" or "["): emphasis, an edit or an alternation."""
        opening = self.prompt[position]
        first, position = self.prompt_part(position + 1)
        separator = self.prompt[position] if position < len(self.prompt) else ""

        if opening == "(":  # (x) or (x:y): emphasis, kept as written
            if separator == ":":
                second, position = self.prompt_part(position + 1)
                return ["(", *first, ":", *second, ")"], self.expect(position, ")")
            return ["(", *first, ")"], self.expect(position, ")")

        if separator == "]":  # [x]: emphasis, kept as written
            return ["[", *first, "]"], position + 1

        if separator == "|":  # [a|b|...]: an alternation; options may be empty
            options = [first]
            while position < len(self.prompt) and self.prompt[position] == "|":
                option, position = self.prompt_part(position + 1)
                options.append(option)
            return [_Alternation(options)], self.expect(position, "]")

        if separator == ":":  # [to:when] or [from:to:when]
            when = _WHEN_AND_CLOSE.match(self.prompt, position + 1)
            if when:  # the text after the first ":" is the number: [to:when]
                return [_Edit(None, first, float(when[1]))], when.end()
            second, position = self.prompt_part(position + 1)
            position = self.expect(position, ":")
            when = _WHEN_AND_CLOSE.match(self.prompt, position)
            if not when:
                raise _NoParse
            return [_Edit(first, second, float(when[1]))], when.end()

        raise _NoParse  # "[" followed by ")" or by the end of the prompt


def _last_step_before(when: float, steps: int) -> int:
    """The last step (counted from 1) that shows an edit's `from`; after it comes `to`.

    We use A1111's "old scheduling" rule (its `use_old_scheduling=True`), the one its wiki documents: a number
    below 1 is a fraction of the steps (`[a:b:0.25]` at 20 steps: step 5), a number from 1 up is a step number
    (`[a:b:2.7]`: step 2), and anything past the last step means the last step. A1111 1.6 and later read numbers
    differently by default: a number written with a decimal point is a fraction of the steps whatever its size
    (`1.0` is the end, `2.5` is 2.5 x steps) and an integer is a step number. We follow the documented rule
    (< 1 a fraction, else a step).
    """
    step = when * steps if when < 1 else when  # A1111's own arithmetic, so that 0.29 * 100 gives step 28 as there
    # int() drops the fraction, as A1111's does. The clamps keep int() away from infinities ("1e999" is a number
    # to the grammar; A1111 fails on it): a step past the last is the last, and as no step below 1 switches
    # anything, every negative step behaves as 0 does (`to` from the start).
    return int(min(max(step, 0), steps))


def _switch_steps(nodes: list, steps: int) -> set[int]:
    """Every step after which some part of the prompt may change, also inside options and edits that are not
    showing at that step (A1111 collects them all)."""
    found = set()
    for node in nodes:
        if isinstance(node, _Edit):
            step = _last_step_before(node.when, steps)
            if step >= 1:  # step 0 (or below) is not a step of the loop: `to` shows from the start
                found.add(step)
            found |= _switch_steps(node.before or [], steps) | _switch_steps(node.after, steps)
        elif isinstance(node, _Alternation):
            found |= set(range(1, steps + 1))  # an alternation changes at every step
            for option in node.options:
                found |= _switch_steps(option, steps)
    return found


def _text_at(nodes: list, step: int, steps: int) -> str:
    """The prompt's text at `step` (counted from 1, as A1111's schedule counts)."""
    parts = []
    for node in nodes:
        if isinstance(node, _Edit):
            showing = (node.before or []) if step <= _last_step_before(node.when, steps) else node.after
            parts.append(_text_at(showing, step, steps))
        elif isinstance(node, _Alternation):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))  # step 1: option 0
        else:
            parts.append(node)
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# LoRA tags, AUTOMATIC1111's extra-network syntax: <lora:NAME> or <lora:NAME:MULTIPLIER> anywhere in a
# prompt asks for that LoRA (lora.py) and is taken out of the text the encoder reads.

LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>", re.IGNORECASE)


def lora_tags(prompt: str) -> list[tuple[str, float]]:
    """The (name, multiplier) of every <lora:NAME> or <lora:NAME:MULTIPLIER> tag of `prompt` (1 if not given)."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        name, *numbers = [part.strip() for part in match.group(1).split(":")]
        if not name or len(numbers) > 1:
            raise ValueError(f"{match.group(0)} is not a LoRA tag sd_scratch reads: write <lora:NAME> or "
                             "<lora:NAME:MULTIPLIER> (one multiplier, for the UNet and the text encoder alike)")
        multiplier = lora_multiplier(numbers[0]) if numbers else 1.0
        if multiplier is None:
            raise ValueError(f"the multiplier of {match.group(0)} is not a number: write e.g. <lora:{name}:0.8>")
        tags.append((name, multiplier))
    return tags


def lora_multiplier(text: str) -> float | None:
    """A LoRA's multiplier as written ("0.8", "-1"), or None when it is not a finite number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def find_lora(name: str, folder: str | Path | None) -> Path:
    """The file a prompt's <lora:NAME> means: NAME.safetensors (or .pt, .ckpt) in `folder` (--lora-dir)."""
    if folder is None:
        raise ValueError(f"the prompt names <lora:{name}>: say where LoRA files lie with --lora-dir")
    for suffix in (".safetensors", ".pt", ".ckpt"):
        if (Path(folder) / (name + suffix)).is_file():
            return Path(folder) / (name + suffix)
    raise ValueError(f"the prompt names <lora:{name}>, but {folder} has no {name}.safetensors (nor .pt, .ckpt)")


def without_lora_tags(prompt: str) -> str:
    """The prompt as the text encoder reads it: the LoRA tags taken out (AUTOMATIC1111 does the same)."""
    return LORA_TAG.sub("", prompt)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A prompt with prompt editing -> [(end_step, text), ...], as A1111's
    `get_learned_conditioning_prompt_schedules` with its old scheduling rule and no hires pass: each text is
    used up to and including its end step, the last end step is `steps`.

    >>> prompt_schedule("a [red:blue:0.5] ball", 10)
    [(5, 'a red ball'), (10, 'a blue ball')]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    prompt = without_lora_tags(prompt)
    try:
        nodes = _ScheduleParser(prompt).top_level()
    except (_NoParse, RecursionError):
        # A1111 uses a prompt its grammar rejects as it is, for every step. (Brackets nested deeper than Python's
        # recursion limit, some hundreds, are treated the same way.)
        return [(steps, prompt)]
    ends = sorted(_switch_steps(nodes, steps) | {steps})
    return [(end, _text_at(nodes, end, steps)) for end in ends]


def text_at_step(schedule: list[tuple[int, str]], step_index: int) -> str:
    """The text the sampling loop uses at its step `step_index` (counted from 0), as A1111's
    `reconstruct_cond_batch` picks it: the first entry whose end step is >= step_index.

    Because the loop counts from 0 and the end steps count from 1, `[a:b:10]` at 20 steps uses `a` for loop
    steps 0 to 10 (eleven steps) and `b` for 11 to 19. Past the last end step A1111 falls back to the first
    entry, and so do we; a loop of `steps` steps never gets there.
    """
    for end_step, text in schedule:
        if step_index <= end_step:
            return text
    return schedule[0][1]
