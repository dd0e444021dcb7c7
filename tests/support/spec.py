"""The protections' names and texts as the maintainers fixed them (../shared/README.md).

Tests compare the server's output against these literals, never against the server's own
table, so a typo in either place fails a test.
"""

ATTACKS = {
    "empty_username": ("POP3 Policy Violation", "No username supplied in USER command"),
    "empty_password": ("POP3 Policy Violation", "No password supplied in PASS command"),
    "non_compliant": ("POP3 Policy Violation", "Non protocol-compliant connection"),
    "stls": ("POP3 Policy Violation", "Illegal POP3 TLS session"),
    "malicious_code": ("POP3 Security Violation", "Malicious Code Protector"),
    "max_bad_commands": ("POP3 Policy Violation", "Too many bad commands"),
    "max_line_length": ("POP3 Format Violation", "Command line is too long"),
    "max_commands": ("POP3 Policy Violation", "Too many commands"),
}
