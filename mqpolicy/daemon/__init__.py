"""What every long-running part shares: structured logging, sd_notify, unix socket files,
connection tasks, reloading the policy on SIGHUP."""
