"""The policy language: the frozen policy read from YAML and the pure pieces it is made of
(conditions, limit keys, rates, destinations, backoff settings, the request). No I/O."""
