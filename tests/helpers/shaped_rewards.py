"""A reward with signal on a random tiny model (Math-Verify would score every completion 0): the share of
completion characters that are digits. Imported by path in reward worker processes."""


def digit_share(completion: str, gold: str) -> float:
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)
