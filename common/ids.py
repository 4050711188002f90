import uuid


def is_uuid(value: str) -> bool:
    """Whether an id from a URL can be a row's UUID (anything else is simply not found)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
