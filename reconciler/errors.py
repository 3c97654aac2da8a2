"""The one exception type users see: its message is the line the CLI prints."""


class MtdError(Exception):
    """A problem the user can fix, described in one line (file, key, value, what was expected).

    Several independent problems (for example every bad key of a state file) may be reported
    at once; each is one line of the message.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class NftError(MtdError):
    """libnftables refused a command, or the kernel did."""
