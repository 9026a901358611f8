"""What Postfix needs for a policy: the ``mqpolicy postfix-config`` settings and their check."""
