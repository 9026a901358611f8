"""``serve``'s admin socket: its protocol, server, operations and the commands' client."""
