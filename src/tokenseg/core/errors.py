"""The one error type of tokenseg: an error caused by the user's input."""


class TokensegError(Exception):
    """An error caused by the user's input (file, config, checkpoint); the message says what to fix."""

