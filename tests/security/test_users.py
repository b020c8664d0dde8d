"""Accounts, JWTs, API keys and rate limits (real SQLite file, real bcrypt, a clock we move)."""

from __future__ import annotations

import os
import stat

import pytest

from tiktrue.database import database_path
from tiktrue.security import users as u


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> u.UserStore:
    s = u.UserStore(tmp_path, clock=clock, rounds=4, jwt_ttl_s=3600)
    yield s
    s.close()


def test_the_first_account_is_admin_and_the_next_are_users(store, tmp_path):
    first = store.add_user("ada", "correct horse", role="user")
    second = store.add_user("bob", "battery staple")
    third = store.add_user("cy", "password123", role="admin")
    assert (first.role, second.role, third.role) == ("admin", "user", "admin")
    assert [x.name for x in store.list_users()] == ["ada", "bob", "cy"]
    assert database_path(tmp_path).is_file()
    with pytest.raises(u.Conflict):
        store.add_user("bob", "another one")
    with pytest.raises(u.UserError, match="at least"):
        store.add_user("dee", "short")
    with pytest.raises(u.UserError, match="72 bytes"):
        store.add_user("dee", "x" * 73)


def test_passwords_are_bcrypt_hashes_and_a_wrong_one_is_refused(store, tmp_path):
    store.add_user("ada", "correct horse")
    stored = store.db.query("SELECT password_hash FROM users")[0][0]
    assert stored.startswith(b"$2b$") and b"correct horse" not in stored
    with pytest.raises(u.InvalidCredentials) as wrong:
        store.login("ada", "correct horsE")
    assert wrong.value.code == "invalid_credentials" and wrong.value.status == 401
    with pytest.raises(u.InvalidCredentials):
        store.login("nobody", "correct horse")
    assert store.verify_token(store.login("ada", "correct horse")).user_name == "ada"


def test_a_jwt_expires_and_a_password_change_ends_older_ones(store, clock, tmp_path):
    store.add_user("ada", "correct horse")
    token = store.login("ada", "correct horse")
    me = store.verify_token(token)
    assert (me.user_name, me.role, me.owner) == ("ada", "admin", f"user:{me.user_id}")
    clock.now += 3599
    assert store.verify_token(token).user_id == me.user_id
    clock.now += 1
    with pytest.raises(u.ExpiredCredentials) as expired:
        store.verify_token(token)
    assert expired.value.code == "credentials_expired" and expired.value.status == 401
    fresh = store.login("ada", "correct horse")
    store.set_password("ada", "new password!")
    with pytest.raises(u.InvalidCredentials, match="password"):
        store.verify_token(fresh)
    with pytest.raises(u.InvalidCredentials):
        store.verify_token(fresh[:-2] + ("AA" if not fresh.endswith("AA") else "BB"))
    other = u.UserStore(tmp_path / "other-node", clock=clock, rounds=4)
    with pytest.raises(u.InvalidCredentials):  # signed with another node's secret
        other.verify_token(store.login("ada", "new password!"))
    secret = tmp_path / u.SECRET_FILE
    if os.name != "nt":
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_api_keys_are_shown_once_stored_hashed_scoped_revocable_and_expire(store, clock):
    store.add_user("ada", "correct horse")
    record, key = store.create_key("ada", name="laptop", networks=["net-a"], expires_in_s=60)
    assert key.startswith("tt-") and len(key) > 40
    assert record.prefix == key[:10] and record.networks == ("net-a",)
    rows = store.db.query("SELECT * FROM api_keys")
    assert key not in repr([dict(r) for r in rows]) and rows[0]["key_hash"] == u.hash_key(key)
    caller = store.authenticate(key)
    assert caller.allows("net-a") and not caller.allows("net-b") and caller.key_id == record.id
    with pytest.raises(u.InvalidCredentials, match="unknown"):
        store.authenticate(key + "x")
    clock.now += 60
    with pytest.raises(u.ExpiredCredentials):
        store.authenticate(key)
    _, everywhere = store.create_key("ada")
    assert store.authenticate(everywhere).networks is None
    revoked = store.revoke_key(store.list_keys("ada")[-1].id)
    assert revoked.state(clock.now) == "revoked"
    with pytest.raises(u.RevokedKey) as refused:
        store.authenticate(everywhere)
    assert refused.value.code == "key_revoked" and refused.value.status == 401
    with pytest.raises(u.Conflict):
        store.revoke_key(revoked.id)
    with pytest.raises(u.NotFound):
        store.revoke_key(999)


def test_removing_an_account_ends_its_keys_and_tokens_but_keeps_the_last_admin(store):
    store.add_user("ada", "correct horse")
    store.add_user("bob", "battery staple")
    _, key = store.create_key("bob")
    token = store.login("bob", "battery staple")
    store.remove_user("bob")
    for credential in (key, token):
        with pytest.raises(u.InvalidCredentials):
            store.authenticate(credential)
    with pytest.raises(u.Conflict, match="only admin"):
        store.remove_user("ada")
    again = store.add_user("bob", "battery staple")
    assert again.id != store.user("ada").id and again.role == "user"
    with pytest.raises(u.InvalidCredentials):  # the new bob is not the old one
        store.authenticate(token)


def test_rate_limits_answer_with_retry_after_then_recover(store, clock):
    clock.now = 1_700_000_000.0 // 86400 * 86400 + 30  # 30 s into a minute and a day
    store.add_user("ada", "correct horse", rpm=3, rpd=5)
    _, key = store.create_key("ada", rpm=2)
    by_key = store.authenticate(key)
    by_login = store.verify_token(store.login("ada", "correct horse"))
    store.hit(by_key)
    store.hit(by_key)
    with pytest.raises(u.RateLimited) as per_key:
        store.hit(by_key)
    assert per_key.value.retry_after == 30 and per_key.value.status == 429
    assert "API key" in per_key.value.message
    store.hit(by_login)  # the account's third request of this minute
    with pytest.raises(u.RateLimited, match="account"):
        store.hit(by_login)
    clock.now += per_key.value.retry_after  # the next minute
    store.hit(by_key)
    store.hit(by_login)  # the account's fifth of the day
    with pytest.raises(u.RateLimited, match="per day") as per_day:
        store.hit(by_login)
    assert per_day.value.retry_after == 86400 - 60
    clock.now += per_day.value.retry_after
    store.hit(by_login)  # a new day
    store.set_user_limits("ada", rpm=None, rpd=None)
    for _ in range(10):
        store.hit(by_login)
    store.hit(u.ANONYMOUS)  # no limits for callers without credentials here


def test_two_stores_on_one_file_see_each_other(tmp_path, clock):
    """The CLI and the running node open the same file: a key made by one works in the other,
    and a revocation takes effect at once."""
    node = u.UserStore(tmp_path, clock=clock, rounds=4)
    cli = u.UserStore(tmp_path, clock=clock, rounds=4)
    cli.add_user("ada", "correct horse")
    record, key = cli.create_key("ada")
    assert node.authenticate(key).user_name == "ada"
    cli.revoke_key(record.id)
    with pytest.raises(u.RevokedKey):
        node.authenticate(key)


def test_token_quotas_refuse_once_the_days_tokens_are_used_then_recover(store, clock):
    clock.now = 1_700_000_000.0 // 86400 * 86400 + 3600  # an hour into a UTC day
    store.add_user("root", "a long password")
    store.add_user("ann", "a long password", tpd=100)
    record, key = store.create_key("ann", tpd=30)
    caller = store.authenticate(key)
    store.hit(caller)
    store.count_tokens(caller, 29)
    store.hit(caller)  # 29 of the key's 30: the next request still runs
    store.count_tokens(caller, 5)  # an answer may pass the quota by its own length
    with pytest.raises(u.RateLimited) as refused:
        store.hit(caller)
    assert refused.value.retry_after == 86400 - 3600  # until the UTC day ends
    assert "30 tokens per day" in refused.value.message
    assert store.tokens_today(f"key:{record.id}") == 34
    # the account's own quota counts all its keys; another key of it is under its 100
    other = store.authenticate(store.create_key("ann")[1])
    store.hit(other)
    store.count_tokens(other, 70)
    with pytest.raises(u.RateLimited, match="100 tokens per day"):
        store.hit(other)
    # a new day: both run again; set_user_limits keeps the quota unless told
    clock.now += refused.value.retry_after
    store.hit(caller)
    assert store.set_user_limits("ann", rpm=None, rpd=None).tpd == 100
    assert store.set_user_limits("ann", rpm=None, rpd=None, tpd=None).tpd is None
    assert store.set_key_quota(record.id, 1000).tpd == 1000


def test_a_requests_class_is_its_own_else_its_keys_else_its_accounts_else_normal(store):
    store.add_user("root", "a long password")
    store.add_user("ann", "a long password", priority="deep")
    plain = store.authenticate(store.create_key("ann")[1])
    record, key = store.create_key("ann", priority="quick")
    quick = store.authenticate(key)
    assert plain.priority_of(None) == "deep"  # the account's default
    assert quick.priority_of(None) == "quick"  # the key's wins over its account's
    assert quick.priority_of("normal") == "normal"  # and the request's over both
    login = store.verify_token(store.login("ann", "a long password"))
    assert login.priority_of(None) == "deep"
    assert store.authenticate(store.create_key("root")[1]).priority_of(None) == "normal"
    assert u.ANONYMOUS.priority_of(None) == "normal"
    # set and unset later (the CLI and the People page); a new caller sees it
    assert store.set_user_priority("ann", None).priority is None
    assert store.authenticate(store.create_key("ann")[1]).priority_of(None) == "normal"
    assert store.set_key_priority(record.id, "deep").priority == "deep"
    assert store.authenticate(key).priority_of(None) == "deep"
    with pytest.raises(u.UserError, match="quick, normal, deep"):
        store.set_user_priority("ann", "urgent")
    with pytest.raises(u.UserError, match="quick, normal, deep"):
        store.create_key("ann", priority="asap")
    with pytest.raises(u.NotFound):
        store.set_key_priority(9999, "quick")
