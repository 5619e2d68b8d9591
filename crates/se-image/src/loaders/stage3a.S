# Coffer's stage3a loader for IBM Secure Execution images (non-secure mode).
#
# Loaded at 0x10000 with the image; the image's IPL PSW (at 0) enters at 0x11000, a stage-3 IPL
# loader at 0x10000. It points the IPL parameter block's Secure Execution fields at the image's
# SE header, hands the block to the Ultravisor (DIAG 308 subcode 8, "set PV IPL parameters") and
# asks it to unpack and start the secure guest (subcode 10). The Ultravisor then decrypts and
# checks the image's components and starts stage3b at the PSW sealed in the SE header.
#
# The last 24 bytes are the arguments the image builder writes (big-endian, offsets from the
# arguments' own address): the SE header's offset and size and the IPL block's offset.
#
# Nothing here can print: a failure stops the CPU in a disabled wait whose PSW address names it
# (0x5e0a0000 | step << 8 | DIAG return code):
#   0x5e0a0100  the machine has no Secure Execution unpack facility (161)
#   0x5e0a02RR  DIAG 308 subcode 8 refused the parameters (RR: its return code)
#   0x5e0a03RR  DIAG 308 subcode 10 failed (RR: its return code)
#   0x5e0a0400  a program check (e.g. DIAG 308's PV subcodes where the hypervisor lacks them)

	.set	IPIB_PV_HDR_ADDR, 120	# ipl_parameter_block: 8-byte header, then pb0_pv's fields
	.set	IPIB_PV_HDR_SIZE, 128
	.set	LC_PGM_NEW_PSW, 0x1d0
	.set	SIGP_SET_ARCHITECTURE, 18

	.text
	.globl	_start
_start:					# 0x10000
	lhi	%r1,1
	sigp	%r1,%r0,SIGP_SET_ARCHITECTURE
	sam64
	larl	%r1,entry
	br	%r1

	.org	0x1000
entry:					# 0x11000
	lhi	%r1,1
	sigp	%r1,%r0,SIGP_SET_ARCHITECTURE
	sam64
	larl	%r1,pgm_check_psw
	mvc	LC_PGM_NEW_PSW(16),0(%r1)
	# Facility 161 (Secure Execution unpack): bit 161 of the STFLE list is byte 20, bit 1.
	larl	%r1,facilities
	lghi	%r0,3			# 4 doublewords
	stfle	0(%r1)
	tm	20(%r1),0x40
	jz	no_unpack
	larl	%r5,args
	lg	%r6,0(%r5)
	la	%r6,0(%r6,%r5)		# SE header address
	lg	%r7,8(%r5)		# SE header size
	lg	%r8,16(%r5)
	la	%r8,0(%r8,%r5)		# IPL parameter block address
	stg	%r6,IPIB_PV_HDR_ADDR(%r8)
	stg	%r7,IPIB_PV_HDR_SIZE(%r8)
	lgr	%r2,%r8
	lghi	%r3,0
	lghi	%r4,8
	diag	%r2,%r4,0x308		# set PV IPL parameters; return code in %r3
	cghi	%r3,1
	jne	set_failed
	lghi	%r2,0
	lghi	%r3,0
	lghi	%r4,10
	diag	%r2,%r4,0x308		# unpack and start: returns only on failure
	llill	%r1,0x0300
	j	stop
set_failed:
	llill	%r1,0x0200
	j	stop
no_unpack:
	llill	%r1,0x0100
	lghi	%r3,0
stop:
	llgcr	%r3,%r3		# the return code's low byte only
	ogr	%r1,%r3
	oilh	%r1,0x5e0a
	larl	%r2,wait_psw
	stg	%r1,8(%r2)
	lpswe	0(%r2)

	.balign	8
pgm_check_psw:
	.quad	0x0002000180000000, 0x5e0a0400
wait_psw:
	.quad	0x0002000180000000, 0
facilities:
	.fill	32,1,0
args:
	.quad	0, 0, 0
