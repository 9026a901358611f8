"""The hold-queue scheduler: the release planner, the MTA queues (Postfix, Sendmail, the
release agent) and the release agent itself."""
