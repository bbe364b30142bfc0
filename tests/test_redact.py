"""Secrets out of spans: the query and URL redaction rules (HTTP semantic
conventions, ``url.query``/``url.full``: sensitive values become REDACTED)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latency_common.redact import REDACTED, QueryRedactor

REDACTOR = QueryRedactor()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        ("a=1", "a=1"),
        ("access_token=abc", f"access_token={REDACTED}"),
        ("x=1&token=t&y=2", f"x=1&token={REDACTED}&y=2"),
        ("Access_Token=abc", f"Access_Token={REDACTED}"),
        ("access%5Ftoken=abc", f"access%5Ftoken={REDACTED}"),
        ("X-Amz-Signature=ff&X-Amz-Date=1", f"X-Amz-Signature={REDACTED}&X-Amz-Date=1"),
        ("sig=1&sig=2", f"sig={REDACTED}&sig={REDACTED}"),
        ("token", "token"),  # a key without a value carries nothing to hide
        ("tokens=1&monkey=2", "tokens=1&monkey=2"),  # whole keys only
        ("a=%2F&code=x;y", f"a=%2F&code={REDACTED}"),
    ],
)
def test_query_values_of_sensitive_keys_are_redacted(raw: str, expected: str) -> None:
    assert REDACTOR.query(raw) == expected


def test_extra_keys_add_to_the_default_list() -> None:
    redactor = QueryRedactor(["session", " Ticket "])
    assert redactor.query("session=1&ticket=2&token=3&q=4") == (
        f"session={REDACTED}&ticket={REDACTED}&token={REDACTED}&q=4"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h/p?q=1", "http://h/p?q=1"),
        ("http://h/p?access_token=s3cret", f"http://h/p?access_token={REDACTED}"),
        (
            "https://u:p@h:1/p?key=k#frag",
            f"https://{REDACTED}:{REDACTED}@h:1/p?key={REDACTED}",
        ),
        ("https://u@h/p", f"https://{REDACTED}@h/p"),
        ("http://h/p@x?token=1", f"http://h/p@x?token={REDACTED}"),
        ("/relative?password=x", f"/relative?password={REDACTED}"),
        ("http://h/cb#access_token=s3cret", "http://h/cb"),
    ],
)
def test_urls_lose_credentials_and_sensitive_values(url: str, expected: str) -> None:
    assert REDACTOR.url(url) == expected


@given(st.text(max_size=200))
def test_redaction_never_raises_and_never_keeps_a_secret(query: str) -> None:
    secret = "S3CRETVALUE"
    out = REDACTOR.url(f"http://h/p?{query}&access_token={secret}")
    assert secret not in out


def test_span_overrides_redact_url_attributes_and_secret_headers() -> None:
    attributes = {
        "http.target": "/p?token=t&q=1",
        "http.url": "http://u:p@h/p?q=1",
        "url.full": "http://h/p?q=1",  # nothing to hide: not overwritten
        "url.query": "sig=s&q=1",
        "http.request.header.authorization": ("Bearer b",),
        "http.request.header.cookie": ("c=1",),
        "http.response.header.set_cookie": ("s=1",),
        "http.request.header.proxy_authorization": ("Basic x",),
        "http.request.header.x_probe": ("visible",),
        "http.response.status_code": 200,
    }
    assert REDACTOR.span_overrides(attributes) == {
        "http.target": f"/p?token={REDACTED}&q=1",
        "http.url": f"http://{REDACTED}:{REDACTED}@h/p?q=1",
        "url.query": f"sig={REDACTED}&q=1",
        "http.request.header.authorization": (REDACTED,),
        "http.request.header.cookie": (REDACTED,),
        "http.response.header.set_cookie": (REDACTED,),
        "http.request.header.proxy_authorization": (REDACTED,),
    }


def test_span_overrides_add_nothing_to_a_clean_span() -> None:
    assert REDACTOR.span_overrides({"url.path": "/p", "http.target": "/p?q=1"}) == {}


def test_a_value_holding_an_equals_sign_is_redacted_whole() -> None:
    # The key ends at the first "=" (WHATWG URL, application/x-www-form-urlencoded
    # parsing): a base64 value's padding is part of the value.
    assert REDACTOR.query("token=YWJj=&page=2") == f"token={REDACTED}&page=2"


def test_a_form_encoded_space_in_a_configured_key_is_decoded() -> None:
    # application/x-www-form-urlencoded: "+" is a space, "%20" too.
    redactor = QueryRedactor(["Session Id"])
    for raw in ("session+id=s1", "Session%20Id=s1", "session+Id=s1"):
        assert redactor.query(raw) == raw.split("=")[0] + f"={REDACTED}", raw
    assert redactor.query("sessionid=s1&session_id=s2") == "sessionid=s1&session_id=s2"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # WHATWG URL: the userinfo ends at the last "@" of the authority.
        ("http://a@b:c@h/p", f"http://{REDACTED}:{REDACTED}@h/p"),
        # An "@" outside the authority is no userinfo: the URL stays as it was.
        ("http://h/p@x/y", "http://h/p@x/y"),
        ("http://h/a://b@c", "http://h/a://b@c"),
        ("a@b://h/p", "a@b://h/p"),
        # No scheme before "://": the authority still starts after it.
        ("://u:p@h/x", f"://{REDACTED}:{REDACTED}@h/x"),
    ],
)
def test_only_the_authoritys_userinfo_is_redacted(url: str, expected: str) -> None:
    assert REDACTOR.url(url) == expected
