"""Postfix policy delegation (``check_policy_service``): the codec, the asyncio server, the
handler that turns attributes into a Postfix action, and explain."""
