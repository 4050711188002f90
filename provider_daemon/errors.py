"""Errors the CLI turns into one clear line and a non-zero exit code."""


class DaemonError(Exception):
    """A failure the GPU owner can act on; its message is shown as is."""


class NvmlUnavailable(DaemonError):
    pass


class SimulateSpecError(DaemonError):
    pass


class ConfigError(DaemonError):
    pass


class JoinError(DaemonError):
    pass


class InfrastructureError(Exception):
    """A job attempt failed because of the platform or this machine, not the user's code."""


class PreflightError(DaemonError):
    """The machine check failed: this machine must not be listed until the owner fixes it."""


class CredentialRejected(DaemonError):
    """The platform no longer accepts this machine's credential (revoked, or it left)."""


class OwnerDisabled(DaemonError):
    """The machine's owner account is disabled: no work until an admin enables it again,
    when the same credential works again."""
