"""The token contract between auth_service (signs, issues) and the gateway (verifies)."""

ISSUER = "gpumarket-auth"
ACCESS_AUDIENCE = "gpumarket"
ALGORITHM = "EdDSA"

# Opaque secrets start with their kind, so the gateway knows where to check them (and a
# secret scanner can spot a leaked one). Anything else in a Bearer header is a JWT.
REFRESH_PREFIX = "gpmr_"
API_KEY_PREFIX = "gpm_"
JOIN_TOKEN_PREFIX = "gpmj_"
AGENT_PREFIX = "gpma_"
