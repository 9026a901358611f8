"""What mqpolicy knows of Postfix itself: where its programs are, the settings a policy needs
(``mqpolicy postfix-config``) and their check against an installed Postfix."""
