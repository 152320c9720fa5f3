"""The one error type users see.

Anything wrong with what a user gave us (a config key, a value, a path, a request) raises
`UserError` with a message that names the problem and what is allowed. The CLI prints it on
one line and exits with code 2; HTTP layers turn it into a 4xx.
"""


class UserError(Exception):
    """A problem in the user's input; the message is shown as is, without a traceback."""

    exit_code = 2
