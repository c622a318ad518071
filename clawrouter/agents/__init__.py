"""Ways for agents to use the gateway with zero glue: the MCP server (`clawrouter mcp`)."""
