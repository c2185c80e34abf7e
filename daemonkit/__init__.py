"""What both daemons (nbdserver and keyservice) share: their process and HTTP edges.

`sdnotify` (systemd readiness and watchdog), `tls` (the loopback rule and the one TLS
configuration error), `tlsca` (the CA of test and demo set-ups), `httplog` (log lines
safe from client input, aiohttp's malformed-request log), `httpguard` (slowloris
protection), `bodies` (request bodies checked against the APIs' pydantic models) and
`openapi` (each API's OpenAPI document from its routes and models). It imports neither
daemon: both depend on it, never the other way round.

The two CLIs' common edge: `clicommand` (every client command's --output/--query and
environment help, one error handling), `cliout` (formats, the error shape, the exit
codes), `config` (the settings file), `deadline` (a whole command's deadline),
`cliprogress` (a long operation's progress line), `rfc3339` (times as people read them)
and `httperrors` (both clients' words for a failed call, and the APIs' error body).
"""
