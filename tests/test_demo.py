"""The demo's API key and login: an admin account made once with a kept password, a fresh key
each run."""

from __future__ import annotations

import pytest

from tiktrue.demo import DEMO_ADMIN, demo_api_key
from tiktrue.security.users import RevokedKey, UserStore


def test_the_demo_makes_an_admin_and_a_fresh_key_each_run(tmp_path):
    first_key, password = demo_api_key(tmp_path)
    second_key, again = demo_api_key(tmp_path)
    assert password and again == password and first_key != second_key
    users = UserStore(tmp_path, rounds=4)
    assert users.check_password(DEMO_ADMIN, password).role == "admin"
    assert users.authenticate(second_key).user_name == DEMO_ADMIN
    with pytest.raises(RevokedKey):
        users.authenticate(first_key)


def test_a_lost_demo_password_is_reset_and_kept(tmp_path):
    _, password = demo_api_key(tmp_path)
    (tmp_path / "demo" / "admin_password").unlink()
    _, new = demo_api_key(tmp_path)
    assert new != password
    users = UserStore(tmp_path, rounds=4)
    assert users.check_password(DEMO_ADMIN, new).role == "admin"
    assert demo_api_key(tmp_path)[1] == new
