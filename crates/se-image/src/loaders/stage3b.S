# Coffer's stage3b loader for IBM Secure Execution images (secure mode).
#
# A component of the image like the kernel: encrypted, and started by the Ultravisor after it
# unpacked and checked every component, at the PSW sealed in the SE header. Position
# independent: it runs where the image placed it. It moves the kernel to where Linux runs
# (dropping the kernel file's first 64 KiB, its IPL header), copies the command line into the
# kernel's parameter area (0x10480, at most the size the kernel declares at 0x10430, or 896
# bytes when it declares none), records the initrd's address and size (0x10408, 0x10410; the
# initrd stays where it was unpacked) and loads the kernel's PSW.
#
# The last 64 bytes are the arguments the image builder writes (big-endian): the kernel's,
# command line's and initrd's address and size as unpacked, then the kernel's PSW. A failure
# stops the CPU in a disabled wait at 0x5e0b00NN:
#   0x5e0b0001  the kernel is smaller than its 64 KiB IPL header
#   0x5e0b0002  the command line is longer than the kernel accepts
#   0x5e0b0003  the command line does not end in a NUL byte

	.set	SIGP_SET_ARCHITECTURE, 18
	.set	IMAGE_ENTRY, 0x10000
	.set	INITRD_START, 0x408	# offsets from IMAGE_ENTRY
	.set	INITRD_SIZE, 0x410
	.set	MAX_COMMAND_LINE_SIZE, 0x430
	.set	COMMAND_LINE, 0x480

	.text
	.globl	_start
_start:
	lhi	%r1,1
	sigp	%r1,%r0,SIGP_SET_ARCHITECTURE
	sam64
	larl	%r13,args
	llilh	%r12,1			# %r12 = IMAGE_ENTRY (0x10000)
	# The kernel: size - 64 KiB bytes from src + 64 KiB to 64 KiB.
	lg	%r8,0(%r13)
	lg	%r9,8(%r13)
	clgr	%r9,%r12
	jl	bad_kernel
	lgr	%r6,%r12
	lgr	%r7,%r9
	slgr	%r7,%r12
	algr	%r8,%r12
	lgr	%r9,%r7
0:	mvcle	%r6,%r8,0
	jo	0b
	# The command line.
	lg	%r8,16(%r13)
	lg	%r9,24(%r13)
	ltgr	%r9,%r9
	jz	initrd
	lg	%r10,MAX_COMMAND_LINE_SIZE(%r12)
	ltgr	%r10,%r10
	jnz	1f
	lghi	%r10,896
1:	clgr	%r9,%r10
	jh	cmdline_too_long
	la	%r11,0(%r9,%r8)
	aghi	%r11,-1
	cli	0(%r11),0
	jne	cmdline_unterminated
	la	%r6,COMMAND_LINE(%r12)
	lgr	%r7,%r9
2:	mvcle	%r6,%r8,0
	jo	2b
initrd:
	lg	%r8,32(%r13)
	lg	%r9,40(%r13)
	ltgr	%r9,%r9
	jz	start_kernel
	stg	%r8,INITRD_START(%r12)
	stg	%r9,INITRD_SIZE(%r12)
start_kernel:
	lpswe	48(%r13)

bad_kernel:
	lghi	%r1,1
	j	stop
cmdline_too_long:
	lghi	%r1,2
	j	stop
cmdline_unterminated:
	lghi	%r1,3
stop:
	oilh	%r1,0x5e0b
	larl	%r2,wait_psw
	stg	%r1,8(%r2)
	lpswe	0(%r2)

	.balign	8
wait_psw:
	.quad	0x0002000180000000, 0
args:
	.fill	64,1,0
