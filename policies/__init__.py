"""Pure decisions about tool calls: breakers, retries, timeouts, capabilities, approvals, limits, audit."""
