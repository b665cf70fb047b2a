"""Constants of the 2008 x86 KVM MMU (arch/x86/kvm/mmu.c, mmu.h; docs/kernel.md, Kernel variants).

Plain ints, named as in the kernel, shared by the walker, the MMU and the auditor.
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1) & ((1 << 64) - 1)

PT64_ENT_PER_PAGE = 512
PT32_ENT_PER_PAGE = 1024
PT64_LEVEL_BITS = 9
PT32_LEVEL_BITS = 10
PT64_ROOT_LEVEL = 4
PT32E_ROOT_LEVEL = 3
PT32_ROOT_LEVEL = 2
PT_DIRECTORY_LEVEL = 2
PT_PAGE_TABLE_LEVEL = 1

# pte bits (guest ptes and sptes share the x86 layout)
PT_PRESENT_MASK = 1 << 0
PT_WRITABLE_MASK = 1 << 1
PT_USER_MASK = 1 << 2
PT_PWT_MASK = 1 << 3
PT_PCD_MASK = 1 << 4
PT_ACCESSED_MASK = 1 << 5
PT_DIRTY_MASK = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
PT_PAT_MASK = PT_PAGE_SIZE_MASK
PT_GLOBAL_MASK = 1 << 8
PT64_NX_MASK = 1 << 63

PT64_BASE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)
PT64_DIR_BASE_ADDR_MASK = PT64_BASE_ADDR_MASK & ~((1 << (PAGE_SHIFT + PT64_LEVEL_BITS)) - 1)
PT32_BASE_ADDR_MASK = 0xFFFFF000
PT32_DIR_BASE_ADDR_MASK = 0xFFC00000
PT32_DIR_PSE36_SHIFT = 13
PT32_DIR_PSE36_MASK = 0xF << PT32_DIR_PSE36_SHIFT
PT64_PERM_MASK = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT64_NX_MASK

# Access rights (role.access, pte_access). ACC_EXEC shares bit 0 with PT_PRESENT.
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = PT_USER_MASK
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# Page-fault error code. PFERR_RSVD is newer than the era (kvmpfn's walker checks reserved bits).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4

# Large pages: 2 MiB only in this era.
KVM_HPAGE_SHIFT = 21
KVM_PAGES_PER_HPAGE = 512

# Shadow-page budget (kvm_host.h / mmu.c, docs/kernel.md, Zapping and recycling).
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
KVM_PERMILLE_MMU_PAGES = 20
KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_MMU_HASH_SHIFT = 10
KVM_NUM_MMU_PAGES = 1 << KVM_MMU_HASH_SHIFT
KVM_MAX_VCPUS = 16

# VMX without EPT, bypass_guest_pf=1 (docs/kernel.md, Kernel variants): the non-present spte values.
SHADOW_TRAP_NONPRESENT_PTE = 0xFFFFFFFFFFFFF001
SHADOW_NOTRAP_NONPRESENT_PTE = 0

INVALID_PAGE = (1 << 64) - 1
UNMAPPED_GVA = (1 << 64) - 1
