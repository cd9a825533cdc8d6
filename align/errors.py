"""The one exception type the CLI turns into a single `error: ...` line (exit code 2)."""


class AlignError(Exception):
    """A user mistake: bad recipe, bad data, missing file. Message format: `<where>: <what>. <fix>`."""

    exit_code = 2
