from common.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    access_token_ttl_s: int = 900
    # A login lasts this long at most, however often its refresh token rotates.
    session_ttl_s: int = 30 * 24 * 3600
    join_token_ttl_s: int = 3600
    min_password_length: int = 10
    # A new signing key is published this long before it signs: longer than the
    # gateway's JWKS cache age, so no gateway meets a kid it does not know.
    signing_key_activation_delay_s: float = 60.0
    signing_key_max_age_days: int = 30
    # After this many failed logins for one email, each further failure doubles a wait,
    # starting at login_block_base_s and capped at login_block_max_s.
    login_max_failures: int = 5
    login_block_base_s: int = 30
    login_block_max_s: int = 900
    api_keys_per_user: int = 50
