"""Small pieces of the launcher's sentences, written once: a count with its noun, an exception's first line, a
duration."""


def count(n: int, noun: str) -> str:
    """'1 process', '2 processes', '3 CPU cores': English plurals of the nouns the launcher counts."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message (or of a text); '' when there is none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def duration(seconds: float) -> str:
    """'0:42', '12:05', '3:07:55'."""
    seconds = int(seconds)
    minutes = f"{seconds // 60 % 60:02d}" if seconds >= 3600 else f"{seconds // 60}"
    return f"{seconds // 3600}:" * (seconds >= 3600) + f"{minutes}:{seconds % 60:02d}"
