"""Replacing one "## " section of a generated report (docs/ACCURACY.md) with a fresh run's, leaving the rest."""


def update_section(path, title, section):
    """Writes `section` (markdown that starts with the line `title`) in place of the section of `path` that starts
    with that line, or appends it when there is none."""
    with open(path) as f:
        text = f.read()
    start = text.find("\n" + title)
    if start < 0:
        text = text.rstrip("\n") + "\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(text)
