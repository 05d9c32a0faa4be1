"""Developer tooling around the services: the ``ragpod`` command and the local supervisor behind ``make run``.

Nothing here is copied into a service image; the services never import it.
"""
