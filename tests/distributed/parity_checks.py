"""What the layout parity tests compare: losses within a tolerance, and the closing sample a run prints."""


def within(a: list[float], b: list[float], steps: int = 10, tol: float = 1e-4) -> bool:
    assert len(a) == len(b) == steps, (a, b)
    return max(abs(x - y) for x, y in zip(a, b)) < tol


def closing_sample(stdout: str) -> str:
    """The text after the sample header: the prompt and the 8 tokens sampled (rank 0 alone prints it)."""
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("sample (")]
    assert len(header) == 1 and "8 tokens;" in lines[header[0]], stdout[-2000:]
    return "\n".join(lines[header[0] + 1:])
