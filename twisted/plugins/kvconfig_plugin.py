"""twistd plugins for kvconfig; importing this file imports no server code."""

from twisted.application.service import ServiceMaker

kvconfig = ServiceMaker(
    "kvconfig",
    "kvconfig.tap",
    "A durable, revisioned configuration server (XML-RPC, a line protocol, UDP "
    "notifications).",
    "kvconfig",
)

kvconfig_agent = ServiceMaker(
    "kvconfig-agent",
    "kvconfig.agenttap",
    "Keeps a file in step with a kvconfig server's keys and reloads the application.",
    "kvconfig-agent",
)
