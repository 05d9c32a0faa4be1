"""What the gateway and the retriever agree on about tenants: the header that names one, its default, and
what a tenant's name may be."""

from __future__ import annotations

DEFAULT_TENANT = "default"
"""The tenant of every caller without keys, of the keys in RAG_API_KEYS, and of chunks stored before tenants."""
TENANT_HEADER = "X-Ragpod-Tenant"
"""Sent by the gateway with every call to the retriever; a call without it is the default tenant's."""
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
"""A letter or digit, then letters, digits, '.', '_' or '-'; 63 characters at most."""
