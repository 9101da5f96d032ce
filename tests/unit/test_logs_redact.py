"""Secrets in log lines and error texts: DSN passwords (with an "@" in them too) and known values."""

from __future__ import annotations

import logging

import pytest

from reactor.core.logs import KeyValueFormatter, add_secret, dsn_secrets, redact


@pytest.mark.parametrize(("text", "secret"), [
    ("postgresql://u:p@ss@db.example/app", "p@ss"),
    ("postgresql://u:pw@db.example:5432/app?sslmode=require", "pw"),
    ("failed: postgresql://reactor:h@rd@pw@10.0.0.1/app x", "h@rd@pw"),
    ("host=db password=p@ss user=u", "p@ss"),
    ("host=db password = 'a b\\' c' user=u", "a b"),
    ('host=db PASSWORD="x y" user=u', "x y"),
    ("https://user:tok3n@example.com/jwks.json", "tok3n"),
    ("jwt_secret=abcdef", "abcdef"),
])
def test_passwords_are_hidden(text: str, secret: str) -> None:
    hidden = redact(text)
    assert secret not in hidden and "***" in hidden


def test_a_registered_secret_is_hidden_anywhere() -> None:
    add_secret("very-secret-value-0123")
    assert redact("the key is very-secret-value-0123.") == "the key is ***."
    add_secret("ab")  # too short to look for in free text; the patterns still catch it in a DSN
    assert redact("about abc") == "about abc"


def test_the_part_of_a_password_libpq_takes_for_a_host() -> None:
    # libpq splits postgresql://u:p@ss@host at the first "@": its errors then name host "ss@host"
    secrets = dsn_secrets("postgresql://u:p@ss@127.0.0.1:5/db")
    assert secrets == ["p@ss", "ss@"]
    for secret in secrets:
        add_secret(secret)
    assert redact("failed to resolve host 'ss@127.0.0.1'") == "failed to resolve host '***@127.0.0.1'"
    assert dsn_secrets("host=h password=p@ss") == ["p@ss", "ss@"]
    assert dsn_secrets("postgresql://u@h/db") == []


def test_log_lines_hide_them_in_the_message_and_the_fields() -> None:
    record = logging.makeLogRecord({
        "name": "reactor.web.feed", "levelname": "WARNING", "levelno": logging.WARNING,
        "msg": "cannot connect to %s", "args": ("postgresql://u:p@ss@h/db",),
        "dsn": "host=h password=p@ss",
    })
    line = KeyValueFormatter().format(record)
    assert "p@ss" not in line and "ss@" not in line
