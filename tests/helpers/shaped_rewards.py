"""A reward with signal on a random tiny model (Math-Verify would score every completion 0): the share of
completion characters that are digits. Imported by path in reward worker processes."""


def digit_share(completion: str, gold: str) -> float:
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def first_character(completion: str, gold: str) -> bool:
    """Correct when the completion's first non-space character is the gold: lets a test plant right answers
    for a random model whose greedy output it has seen."""
    return completion.strip()[:1] == gold
