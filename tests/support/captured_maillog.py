"""Delivery log lines verbatim from a private Postfix 3.7.11 (``maillog_file``) relaying to
a local SMTP server that answered with the providers' texts."""

from __future__ import annotations

CAPTURED = {
    "sent": "Nov 27 20:52:09 mta postfix/smtp[368]: AD7D120D033: to=<ok@gmail.test>, relay=127.0.0.1[127.0.0.1]:53003, delay=0.06, delays=0.03/0.03/0/0, dsn=2.0.0, status=sent (250 2.0.0 OK  1732739462 a1-20020a05600000001si123456wrx.123 - gsmtp)",
    "gmail_421": "Nov 27 20:52:09 mta postfix/smtp[368]: B084820C4AA: to=<gmail@gmail.test>, relay=127.0.0.1[127.0.0.1]:53003, delay=0.06, delays=0.01/0.03/0.01/0.01, dsn=4.7.28, status=deferred (host 127.0.0.1[127.0.0.1] said: 421-4.7.28 [192.0.2.10      15] Our system has detected an unusual rate of 421-4.7.28 unsolicited mail originating from your IP address. To protect our 421-4.7.28 users from spam, mail sent from your IP address has been temporarily 421-4.7.28 rate limited. Please visit 421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to 421 4.7.28 review our Bulk Email Senders Guidelines. a1si123.456 - gsmtp (in reply to RCPT TO command))",
    "yahoo_421": "Nov 27 20:52:09 mta postfix/smtp[368]: B342320C527: to=<yahoo@yahoo.test>, relay=127.0.0.1[127.0.0.1]:53003, delay=0.06, delays=0.01/0.04/0/0.01, dsn=4.7.0, status=deferred (host 127.0.0.1[127.0.0.1] said: 421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes (in reply to RCPT TO command))",
    "microsoft_451": "Nov 27 20:52:09 mta postfix/smtp[368]: B504E20D034: to=<ms@outlook.test>, relay=127.0.0.1[127.0.0.1]:53003, delay=0.05, delays=0/0.05/0/0, dsn=4.7.650, status=deferred (host 127.0.0.1[127.0.0.1] said: 451 4.7.650 The mail server [192.0.2.10] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://aka.ms/postmaster (S775) [Name=Protocol Filter Agent][AGT=PFA][MxId=11BB1D2A3F4E5] [BN1NAM02FT032.eop-nam02.prod.protection.outlook.com] (in reply to RCPT TO command))",
    "mailbox_busy": "Nov 27 20:52:09 mta postfix/smtp[370]: B684B20D036: to=<busy@gmail.test>, relay=127.0.0.1[127.0.0.1]:53003, delay=0.11, delays=0/0.05/0.02/0.03, dsn=4.2.1, status=deferred (host 127.0.0.1[127.0.0.1] said: 450 4.2.1 The user you are trying to contact is receiving mail too quickly (try again later) (in reply to RCPT TO command))",
    "discard": "Nov 27 20:52:09 mta postfix/discard[376]: BDE3E20C0B6: to=<x@discard.test>, relay=none, delay=0.08, delays=0.01/0.07/0/0, dsn=2.0.0, status=sent (discard.test)",
    "bounced": "Nov 27 20:52:09 mta postfix/smtp[368]: B5B7B20D035: to=<unknown@gmail.test>, relay=127.0.0.1[127.0.0.1]:53003, conn_use=2, delay=0.13, delays=0/0.05/0/0.07, dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 550-5.1.1 The email account that you tried to reach does not exist. Please try 550-5.1.1 double-checking the recipient's email address for typos or 550 5.1.1 unnecessary spaces. (user (x) unknown) a1si - gsmtp (in reply to RCPT TO command))",
    "odd_quoting": 'Nov 27 20:52:09 mta postfix/smtp[370]: B766C20D0A2: to=<"odd user"@odd.test>, relay=127.0.0.1[127.0.0.1]:53003, conn_use=2, delay=0.12, delays=0/0.11/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 OK  1732739462 a1-20020a05600000001si123456wrx.123 - gsmtp)',
    "bulk_sent": "Nov 27 20:52:09 mta postfix/mq-bulk/smtp[378]: C05C920D26E: to=<ok@bulk.test>, relay=127.0.0.1[127.0.0.1]:53003, delay=0.09, delays=0/0.08/0/0, dsn=2.0.0, status=sent (250 2.0.0 OK  1732739462 a1-20020a05600000001si123456wrx.123 - gsmtp)",
    "refused": "Nov 27 20:52:09 mta postfix/smtp[370]: BB8A620D033: to=<x@refused.test>, relay=none, delay=0.11, delays=0.01/0.09/0/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:50587: Connection refused)",
    "greeting_421": "Nov 27 20:52:09 mta postfix/smtp[386]: B865920D268: to=<x@greet.test>, relay=127.0.0.1[127.0.0.1]:54719, delay=0.12, delays=0.01/0.11/0/0, dsn=4.7.0, status=deferred (host 127.0.0.1[127.0.0.1] refused to talk to me: 421 4.7.0 mx.test Service unavailable, too many connections from 192.0.2.10, try again later)",
}


CAPTURED_OTHER = [
    "Nov 27 20:52:09 mta postfix/postfix-script[32767]: starting the Postfix mail system",
    "Nov 27 20:52:09 mta postfix/master[305]: daemon started -- version 3.7.11, configuration /tmp/mqpostfix-dsk48y41/etc",
    "Nov 27 20:52:09 mta postfix/smtpd[333]: connect from unknown[127.0.0.1]",
    "Nov 27 20:52:09 mta postfix/smtpd[333]: AD7D120D033: client=unknown[127.0.0.1]",
    "Nov 27 20:52:09 mta postfix/cleanup[362]: AD7D120D033: message-id=<20261127205209.AD7D120D033@mta.mqpolicy.test>",
    "Nov 27 20:52:09 mta postfix/qmgr[328]: AD7D120D033: from=<sender@mqpolicy.test>, size=342, nrcpt=1 (queue active)",
    "Nov 27 20:52:09 mta postfix/qmgr[328]: AD7D120D033: removed",
    "Nov 27 20:52:09 mta postfix/smtpd[333]: disconnect from unknown[127.0.0.1] ehlo=1 mail=12 rcpt=12 data=12 quit=1 commands=38",
    "Nov 27 20:52:09 mta postfix/smtp[370]: connect to 127.0.0.1[127.0.0.1]:50587: Connection refused",
    "Nov 27 20:52:09 mta postfix/bounce[380]: B5B7B20D035: sender non-delivery notification: D8C0220C0B9",
]
