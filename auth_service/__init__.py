"""Users, roles, password hashes, signing keys (JWKS), provider join tokens."""
