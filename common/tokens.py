"""The token contract between auth_service (signs) and the gateway (verifies)."""

ISSUER = "gpumarket-auth"
ACCESS_AUDIENCE = "gpumarket"
AGENT_AUDIENCE = "gpumarket-agent"
ALGORITHM = "EdDSA"
