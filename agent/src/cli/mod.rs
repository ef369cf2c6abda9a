//! The operator CLI: one module per verb, talking to the agent's API. (Stub: the CLI work
//! fills this in.)
