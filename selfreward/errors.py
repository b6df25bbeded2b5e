from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad recipe, bad file, missing model).

    The CLI prints the message as one line and exits with code 2; anything else is a bug and keeps
    its traceback.
    """
