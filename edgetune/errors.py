"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a missing file, a wrong option, a dataset that does not fit the model).

    Library code raises it with a message that says what is wrong and, where it can, what to do.
    """
