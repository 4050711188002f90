from common.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    access_token_ttl_s: int = 900
    agent_credential_ttl_days: int = 365
    join_token_ttl_s: int = 3600
    min_password_length: int = 8
