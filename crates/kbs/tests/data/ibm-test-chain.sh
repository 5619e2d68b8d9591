#!/usr/bin/env bash
# Writes a test stand-in of IBM's host-key signing chain into DIR with OpenSSL: a root CA, an
# intermediate CA, a signing certificate with the subject IBM's tools require (C, ST, L, O, OU
# ending in "Key Signing Service", CN), CRLs from all three, and three host-key documents (P-521)
# issued by the signing key: good.crt, revoked.crt (on the signing key's CRL) and expired.crt
# (valid in January 2020), each with its key. Usage: ibm-test-chain.sh DIR
set -euo pipefail
d=$1
cd "$d"
ca_conf() { # name key cert
cat > $1.cnf <<CNF
[ ca ]
default_ca = this
[ this ]
dir = $d/$1
database = \$dir/index.txt
new_certs_dir = \$dir
serial = \$dir/serial
crlnumber = \$dir/crlnumber
certificate = $d/$3
private_key = $d/$2
default_md = sha512
default_crl_days = 30
policy = anything
copy_extensions = none
unique_subject = no
[ anything ]
commonName = optional
[ ca_ext ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ sign_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[ hkd_ext ]
authorityKeyIdentifier = keyid:always
[ crl_ext ]
authorityKeyIdentifier = keyid:always
CNF
mkdir -p $1; : > $1/index.txt; echo 1000 > $1/serial; echo 01 > $1/crlnumber
}
openssl req -x509 -newkey rsa:2048 -nodes -keyout root.key -out root.crt -subj "/CN=Coffer Test Root CA" -days 30 \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -addext subjectKeyIdentifier=hash 2>/dev/null
ca_conf root root.key root.crt
openssl req -newkey rsa:2048 -nodes -keyout inter.key -out inter.csr -subj "/CN=Coffer Test Intermediate CA" 2>/dev/null
openssl ca -batch -config root.cnf -extensions ca_ext -days 30 -in inter.csr -out inter.crt -notext 2>/dev/null
ca_conf inter inter.key inter.crt
openssl req -newkey rsa:2048 -nodes -keyout sign.key -out sign.csr \
  -subj "/C=US/ST=New York/L=Poughkeepsie/O=International Business Machines Corporation/OU=IBM Z Host Key Signing Service/CN=International Business Machines Corporation" 2>/dev/null
sed -i 's/^commonName = optional/commonName = optional\ncountryName = optional\nstateOrProvinceName = optional\nlocalityName = optional\norganizationName = optional\norganizationalUnitName = optional/' inter.cnf
openssl ca -batch -config inter.cnf -extensions sign_ext -days 30 -in sign.csr -out sign.crt -notext -preserveDN 2>/dev/null
ca_conf sign sign.key sign.crt
sed -i 's/^commonName = optional/commonName = optional\ncountryName = optional\nstateOrProvinceName = optional\nlocalityName = optional\norganizationName = optional\norganizationalUnitName = optional/' sign.cnf
for h in good revoked expired; do
  openssl ecparam -name secp521r1 -genkey -noout -out $h.key
  openssl req -new -key $h.key -out $h.csr -subj "/C=US/ST=New York/L=Poughkeepsie/O=International Business Machines Corporation/OU=IBM Z Host Key Signing Service/CN=$h host" 2>/dev/null
done
openssl ca -batch -config sign.cnf -extensions hkd_ext -days 30 -in good.csr -out good.crt -notext -preserveDN 2>/dev/null
openssl ca -batch -config sign.cnf -extensions hkd_ext -days 30 -in revoked.csr -out revoked.crt -notext -preserveDN 2>/dev/null
openssl ca -batch -config sign.cnf -extensions hkd_ext -startdate 20200101000000Z -enddate 20200201000000Z -in expired.csr -out expired.crt -notext -preserveDN 2>/dev/null
openssl ca -config sign.cnf -revoke revoked.crt 2>/dev/null
for c in root inter sign; do openssl ca -config $c.cnf -gencrl -crlexts crl_ext -out $c.crl 2>/dev/null; done
