"""Synthetic chat corpus for the built-in demo model: arithmetic and simple reasoning in the V4 chat format.

Every problem has a question, a short step-by-step trace that really does the work (column
addition with carries, subtraction with borrows, multiplication digit by digit, digit-wise
comparison, spelling with a running letter count) and a final answer. A conversation renders
it in thinking mode (`<think>` trace `</think>` answer) or non-thinking mode (answer only)
with `encode_messages`, sometimes after a system prompt or earlier turns.

Problems are split into training and held-out evaluation sets by a hash of their canonical
key (operands, word and letter...), so no evaluation question is ever trained on, whatever
the seed. Everything is drawn from a `random.Random`, so a seed gives the same corpus.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dsv4cli.chat.encoding import encode_messages

HELD_OUT_PERCENT = 10
#: kind -> share of the training mix.
KIND_WEIGHTS = {"add": 24, "sub": 18, "mul": 14, "compare": 10, "count": 16, "word": 14, "chat": 4}
EVAL_KINDS = ("add", "sub", "mul", "compare", "count", "word")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a tiny DeepSeek-V4 demo model. You are good at arithmetic.",
    "You are a careful math tutor. Answer briefly.",
    "Answer the user's question.",
    "Think step by step when you are allowed to think.",
)
SYSTEM_SHARE = 0.2
MULTI_TURN_SHARE = 0.1
THINK_MAX_SHARE = 0.05
#: column names of the written-out calculations, ones first.
COLUMNS = ("Units", "Tens", "Hundreds", "Thousands")

WORDS = (
    "accessible", "address", "apple", "assessment", "autumn", "balloon", "banana", "beginning", "berry", "bicycle",
    "bottle", "bread", "bridge", "butter", "button", "carrot", "castle", "cheese", "cherry", "coconut", "coffee",
    "committee", "computer", "cookie", "different", "dizzy", "doctor", "dragon", "elephant", "engine", "excellent",
    "flower", "forest", "funny", "fuzzy", "garden", "garlic", "grape", "hammer", "happy", "hello", "island", "jazz",
    "jelly", "keyboard", "kitten", "ladder", "lemon", "letter", "little", "mammal", "middle", "mirror", "monkey",
    "mountain", "necessary", "ocean", "onion", "orange", "paper", "parallel", "pasta", "peach", "pencil", "pepper",
    "pillow", "pizza", "planet", "possible", "potato", "program", "puppy", "purple", "puzzle", "python", "rabbit",
    "river", "rocket", "school", "silence", "silver", "spring", "strawberry", "student", "success", "summer",
    "sunny", "teacher", "tiger", "tomato", "tomorrow", "tunnel", "turtle", "window", "winter", "world", "yellow",
    "yesterday"
)
NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe")
ITEMS = ("apples", "books", "coins", "stamps", "marbles", "cards", "stickers", "pens", "shells", "cookies")

ADD_TEMPLATES = ("What is {a} + {b}?", "What is {a}+{b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
                 "{a} + {b} = ?", "What is the sum of {a} and {b}?", "Calculate {a} plus {b}.", "{a}+{b}")
SUB_TEMPLATES = ("What is {a} - {b}?", "What is {a}-{b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
                 "{a} - {b} = ?", "What is {a} minus {b}?", "{a}-{b}")
MUL_TEMPLATES = ("What is {a} * {b}?", "What is {a}*{b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
                 "{a} * {b} = ?", "Compute {a} x {b}.")
CMP_TEMPLATES = ("Which is larger, {a} or {b}?", "Which is bigger: {a} or {b}?", "Which number is greater, {a} or {b}?",
                 "Which is smaller, {a} or {b}?", "Which number is less, {a} or {b}?")
COUNT_TEMPLATES = ("How many times does the letter {c} appear in {w}?", "How many {c}'s are in {w}?",
                   "Count the letter {c} in the word {w}.", "How many letters {c} does {w} have?")
CHATS = (
    ("Hello", "The user greets me. I should greet back and say what I can do.",
     "Hello! I am a tiny DeepSeek-V4 demo model. Ask me to add, subtract, multiply or compare numbers, "
     "or to count letters in a word."),
    ("Hi!", "The user greets me. I should greet back.",
     "Hi! Ask me an arithmetic question, for example: What is 123 + 456?"),
    ("Who are you?", "The user asks who I am. I am the built-in demo model.",
     "I am the built-in demo model of dsv4: a very small model with the DeepSeek-V4 architecture, "
     "trained on synthetic arithmetic questions."),
    ("What can you do?", "The user asks what I can do. I know simple arithmetic and letter counting.",
     "I can add, subtract and multiply numbers, compare two numbers, solve short word problems and "
     "count letters in a word. In think mode I show my steps."),
    ("Thanks!", "The user thanks me. I should reply politely.", "You are welcome!"),
    ("Thank you", "The user thanks me. I should reply politely.", "You are welcome! Ask me another question."),
)


@dataclass(frozen=True)
class Problem:
    """One question with its reasoning trace, final answer and the expected answer value."""

    kind: str
    key: str  # canonical identity: decides the train / held-out split
    question: str
    reasoning: str
    answer: str
    value: str  # what a correct answer must end with (a number), "" for small talk


def is_held_out(key: str) -> bool:
    """Whether the problem with this canonical key belongs to the held-out evaluation set."""
    digest = hashlib.sha256(f"dsv4-demo/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELD_OUT_PERCENT


# ------------------------------------------------------------------------ traces


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n, least significant first, zero-padded to `width`."""
    return [(n // 10**i) % 10 for i in range(width)]


def add_trace(a: int, b: int) -> str:
    """Column addition, ones first; one true equation per column, `+1` for a carry in."""
    width = max(len(str(a)), len(str(b)))
    lines, carry = [f"{a}+{b}"], 0
    for column, x, y in zip(COLUMNS, _digits(a, width), _digits(b, width), strict=False):
        total = x + y + carry
        lines.append(f"{column}:{x}+{y}" + ("+1" if carry else "") + f"={total}")
        carry = total // 10
    return "\n".join(lines)


def sub_trace(a: int, b: int) -> str:
    """Column subtraction (a >= b), ones first; a borrow shows as 10 added to the top digit, `-1` in
    the next column."""
    width = len(str(a))
    lines, borrow = [f"{a}-{b}"], 0
    for column, x, y in zip(COLUMNS, _digits(a, width), _digits(b, width), strict=False):
        out = 1 if x - y - borrow < 0 else 0
        top = x + 10 * out
        lines.append(f"{column}:{top}-{y}" + ("-1" if borrow else "") + f"={top - y - borrow}")
        borrow = out
    return "\n".join(lines)


def mul_trace(a: int, b: int) -> str:
    """a times a one-digit b, ones first; `+c` adds the carry of the previous column, in two steps."""
    lines, carry = [f"{a}*{b}"], 0
    for column, x in zip(COLUMNS, _digits(a, len(str(a))), strict=False):
        total = x * b + carry
        lines.append(f"{column}:{x}*{b}" + (f"+{carry}={x * b}+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return "\n".join(lines)


def compare_trace(a: int, b: int) -> str:
    """Compare by length, else digit by digit from the left until two digits differ."""
    lines = [f"{a} vs {b}"]
    sa, sb = str(a), str(b)
    if len(sa) != len(sb):
        sign = ">" if len(sa) > len(sb) else "<"
        lines.append(f"{len(sa)} digits {sign} {len(sb)} digits")
        return "\n".join(lines)
    for column, x, y in zip(reversed(COLUMNS[:len(sa)]), sa, sb, strict=True):
        sign = "=" if x == y else (">" if x > y else "<")
        lines.append(f"{column}:{x}{sign}{y}")
        if x != y:
            break
    return "\n".join(lines)


def count_trace(word: str, letter: str) -> str:
    """Spell the word letter by letter, marking each match with the running count."""
    out, count = [], 0
    for ch in word:
        if ch == letter:
            count += 1
            out.append(f"{ch}={count}")
        else:
            out.append(ch)
    return f"Count {letter} in {word}: " + " ".join(out) + f"\ntotal {count}"


# ----------------------------------------------------------------------- problems


def _operand(rng: random.Random, low_digits: int = 1, high_digits: int = 3) -> int:
    digits = rng.choices(range(low_digits, high_digits + 1), weights=[1, 2, 4][low_digits - 1:high_digits])[0]
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_add(rng: random.Random) -> Problem:
    a, b = _operand(rng), _operand(rng)
    question = rng.choice(ADD_TEMPLATES).format(a=a, b=b)
    return Problem("add", f"add:{min(a, b)}:{max(a, b)}", question, add_trace(a, b), f"{a} + {b} = {a + b}.",
                   str(a + b))


def make_sub(rng: random.Random) -> Problem:
    a, b = _operand(rng), _operand(rng)
    a, b = max(a, b), min(a, b)
    question = rng.choice(SUB_TEMPLATES).format(a=a, b=b)
    return Problem("sub", f"sub:{a}:{b}", question, sub_trace(a, b), f"{a} - {b} = {a - b}.", str(a - b))


def make_mul(rng: random.Random) -> Problem:
    a, b = _operand(rng, 2, 3), rng.randint(2, 9)
    question = rng.choice(MUL_TEMPLATES).format(a=a, b=b)
    return Problem("mul", f"mul:{a}:{b}", question, mul_trace(a, b), f"{a} * {b} = {a * b}.", str(a * b))


def make_compare(rng: random.Random) -> Problem:
    a = _operand(rng)
    b = a + rng.choice((-1, 1)) * rng.choice((1, 2, 5, 10, 30, 100, 300))
    if b < 0 or b > 999 or rng.random() < 0.3:
        b = _operand(rng)
    if a == b:
        b = a + 1
    template = rng.choice(CMP_TEMPLATES)
    smaller = "smaller" in template or "less" in template
    pick = min(a, b) if smaller else max(a, b)
    answer = f"{pick} is {'smaller' if smaller else 'larger'}."
    kind = "min" if smaller else "max"
    return Problem("compare", f"cmp:{kind}:{min(a, b)}:{max(a, b)}", template.format(a=a, b=b),
                   compare_trace(a, b), answer, str(pick))


def make_count(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n = word.count(letter)
    question = rng.choice(COUNT_TEMPLATES).format(c=letter, w=word)
    answer = f"The letter {letter} appears {n} time{'' if n == 1 else 's'} in {word}."
    return Problem("count", f"count:{word}:{letter}", question, count_trace(word, letter), answer, str(n))


def make_word(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    story = rng.choice(("buy", "give", "both", "boxes"))
    if story == "both":
        a, b = _operand(rng, 2, 2), _operand(rng, 1, 2)
        c = rng.randint(1, a + b)
        question = (f"{name} has {a} {item}, gets {b} more and then gives away {c}. "
                    f"How many {item} does {name} have now?")
        reasoning = add_trace(a, b) + "\n" + sub_trace(a + b, c)
        value = a + b - c
    elif story == "give":
        a = _operand(rng, 2, 3)
        b = rng.randint(1, a)
        question = f"{name} has {a} {item} and gives {b} to a friend. How many {item} are left?"
        reasoning, value = sub_trace(a, b), a - b
    else:
        a, b = _operand(rng, 2, 3), _operand(rng, 1, 3)
        question = (f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
                    if story == "buy" else
                    f"One box has {a} {item} and another has {b}. How many {item} are there in total?")
        reasoning, value = add_trace(a, b), a + b
    answer = f"{name} has {value} {item} now." if story != "boxes" else f"There are {value} {item} in total."
    if story == "give":
        answer = f"{value} {item} are left."
    numbers = ":".join(re.findall(r"\d+", question))
    return Problem("word", f"word:{story}:{numbers}", question, reasoning, answer, str(value))


def make_chat(rng: random.Random) -> Problem:
    question, reasoning, answer = rng.choice(CHATS)
    return Problem("chat", f"chat:{question}", question, reasoning, answer, "")


MAKERS = {"add": make_add, "sub": make_sub, "mul": make_mul, "compare": make_compare, "count": make_count,
          "word": make_word, "chat": make_chat}


def sample_problem(rng: random.Random, kind: str | None = None, held_out: bool = False) -> Problem:
    """A random problem of `kind` (or of the training mix) from the training or the held-out split.

    Small talk has no held-out split: it is always training data.
    """
    if kind is None:
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    while True:
        problem = MAKERS[kind](rng)
        if kind == "chat" or is_held_out(problem.key) == held_out:
            return problem


# ------------------------------------------------------------------ conversations


@dataclass(frozen=True)
class Example:
    """One training conversation: the prompt up to the assistant turn, and what the model must write."""

    prompt: str
    completion: str
    problem: Problem
    think: bool


def conversation(problem: Problem, earlier: list[Problem] = (), system: str | None = None
                 ) -> list[dict[str, Any]]:
    """Messages ending with `problem`'s assistant turn (reasoning included; the encoder drops it
    in non-thinking mode and from earlier turns)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for prev in earlier:
        messages += [{"role": "user", "content": prev.question}, {"role": "assistant", "content": prev.answer}]
    messages += [{"role": "user", "content": problem.question},
                 {"role": "assistant", "content": problem.answer, "reasoning_content": problem.reasoning}]
    return messages


def render(messages: list[dict[str, Any]], think: bool, effort: str | None = None) -> tuple[str, str]:
    """(prompt, completion) of a conversation whose last message is the assistant's answer."""
    mode = {"thinking_mode": "thinking" if think else "chat", "reasoning_effort": effort if think else None}
    prompt = encode_messages(messages[:-1], **mode)
    full = encode_messages(messages, **mode)
    if not full.startswith(prompt):
        raise AssertionError("the encoded conversation does not extend its prompt")
    return prompt, full[len(prompt):]


def make_example(rng: random.Random, think: bool, kind: str | None = None, held_out: bool = False) -> Example:
    """A conversation around one problem, sometimes with a system prompt or earlier turns."""
    problem = sample_problem(rng, kind, held_out)
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_SHARE else None
    earlier = ([sample_problem(rng) for _ in range(rng.randint(1, 2))]
               if rng.random() < MULTI_TURN_SHARE else [])
    effort = "max" if think and rng.random() < THINK_MAX_SHARE else "high"
    prompt, completion = render(conversation(problem, earlier, system), think, effort)
    return Example(prompt, completion, problem, think)


def training_examples(seed: int) -> Iterator[Example]:
    """An endless, seeded stream of training conversations; each problem comes in both modes."""
    rng = random.Random(seed)
    while True:
        state = rng.getstate()
        think_first = make_example(rng, think=True)
        rng.setstate(state)
        yield think_first
        yield make_example(rng, think=False)


def eval_problems(seed: int, per_kind: int, kinds: tuple[str, ...] = EVAL_KINDS) -> list[Problem]:
    """`per_kind` distinct held-out problems of each kind (never produced by `training_examples`)."""
    rng = random.Random(seed)
    out: list[Problem] = []
    for kind in kinds:
        seen: set[str] = set()
        while len(seen) < per_kind:
            problem = sample_problem(rng, kind, held_out=True)
            if problem.key not in seen:
                seen.add(problem.key)
                out.append(problem)
    return out


_INTEGER = re.compile(r"-?\d+")


def answer_value(text: str) -> str | None:
    """The last integer in an answer text (what `Problem.value` is compared with)."""
    found = _INTEGER.findall(text)
    return found[-1] if found else None


def is_correct(problem: Problem, content: str) -> bool:
    return answer_value(content) == problem.value
