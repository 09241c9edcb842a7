"""The process settings of aesearch/settings.py, as the entry points apply them."""

import logging

from aesearch import settings


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_rays_notice_that_token_authentication_is_on_by_default_is_not_printed_its_other_warnings_are():
    """Ray warns on every local start that token authentication is on by default; aesearch leaves the
    authentication as Ray sets it, without the notice. Emitted by Ray's own functions: a Ray that
    words or logs it elsewhere fails here."""
    from ray._private.authentication import authentication_token_setup as setup

    settings.apply()
    collect = Collect()
    setup.logger.addHandler(collect)
    try:
        setup._warn_token_auth_enabled()
        setup._warn_token_auth_disabled()  # a cluster started without authentication: still said
    finally:
        setup.logger.removeHandler(collect)
    assert len(collect.messages) == 1 and "Token authentication is disabled" in collect.messages[0]
