"""The demo's API key: an admin account made once, a fresh key each run."""

from __future__ import annotations

import pytest

from tiktrue.demo import DEMO_ADMIN, demo_api_key
from tiktrue.security.users import RevokedKey, UserStore


def test_the_demo_makes_an_admin_and_a_fresh_key_each_run(tmp_path):
    first_key, password = demo_api_key(tmp_path)
    second_key, again = demo_api_key(tmp_path)
    assert password and again is None and first_key != second_key
    users = UserStore(tmp_path, rounds=4)
    assert users.check_password(DEMO_ADMIN, password).role == "admin"
    assert users.authenticate(second_key).user_name == DEMO_ADMIN
    with pytest.raises(RevokedKey):
        users.authenticate(first_key)
