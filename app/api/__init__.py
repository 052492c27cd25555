"""The HTTP API: one router per resource, errors mapped to problem details in one place."""
